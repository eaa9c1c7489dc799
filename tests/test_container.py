"""The image users build from the Dockerfile, and the compose demo, built and run with podman.

Owns: building the image once per session (from a debootstrapped debian:bookworm-slim when no such
image is there yet: no registry is reachable); running it against the test PostgreSQL with the
Kubernetes manifests' security settings (non-root, read-only root filesystem, no new privileges,
no capabilities): proxying, /metrics, the image's HEALTHCHECK command, the start-up warning about
an admin port without a token, and the SIGTERM drain; then the compose stack (everything but
Grafana, which no registry here can provide) with podman-compose: Prometheus scrapes pgscout, loads
the alert rules, sees the demo app's N+1, and the demo containers stop on SIGTERM.
Must not: skip when podman, debootstrap or podman-compose is missing (.ci/run installs them; a
missing tool is a broken test machine), publish a port beyond 127.0.0.1, or leave a container,
pod or network behind.

Containers that need the test PostgreSQL (on the host's loopback) share the host's network
namespace and are told to listen on free loopback ports; the others get podman's private network.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
import yaml

from pgharness import APP_DATABASE, REPO_ROOT, free_port, make_dsn, wait_until

pytestmark = pytest.mark.container

# Where this host's containers get their runtime and limits (see the file's comments).
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
STANDINS = Path(__file__).resolve().parent / "container_standins"
BASE_IMAGE = "debian:bookworm-slim"
IMAGE = "localhost/pgscout:test"
# The names deploy/docker-compose.yml gives the images it builds.
COMPOSE_PGSCOUT_IMAGE = "pgscout:dev"
COMPOSE_DEMO_APP_IMAGE = "pgscout-demo-app:dev"
IMAGE_USER = "10001"
# The manifests' securityContext (deploy/kubernetes/deployment.yaml) as podman options.
RESTRICTED = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", IMAGE_USER]
BUILD_TIMEOUT_SECONDS = 900


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("podman")
    assert executable, "podman is missing: install Debian's podman, buildah and runc (.ci/run does)"
    result = subprocess.run([executable, *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (deb822 or one-line sources)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text()
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            if uris and re.search(r"^Suites:.*\bbookworm\b", stanza, re.M) and uris.group(1).rstrip("/").endswith("/debian"):
                return uris.group(1)
        line = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\s", text, re.M)
        if line:
            return line.group(1)
    raise AssertionError("no Debian bookworm mirror in /etc/apt/sources.list*")


def ensure_base_image() -> None:
    """debian:bookworm-slim as Debian's own minimal bootstrap, unless an image of that name exists."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    debootstrap = shutil.which("debootstrap")
    assert debootstrap, "debootstrap is missing (.ci/run installs it)"
    with tempfile.TemporaryDirectory(prefix="pgscout-rootfs-") as rootfs:
        result = subprocess.run([debootstrap, "--variant=minbase", "bookworm", rootfs, debian_mirror()],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"debootstrap:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        # What the slim image leaves out too: the downloaded packages and apt's lists.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (Path(rootfs) / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([shutil.which("podman"), "import", "--change", 'CMD ["bash"]', "-", BASE_IMAGE],
                                  stdin=tar.stdout, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
        tar.stdout.close()
        assert tar.wait() == 0 and imported.returncode == 0, f"podman import: {imported.stderr}"


class Build:
    """One `podman build` as a user would run it, in the background, with this host's CA bundle
    for pip as a build secret only. --format docker keeps HEALTHCHECK (OCI's format has none)."""

    def __init__(self, context: Path, *tags: str):
        self.context, self.tags = context, tags
        ca_bundle = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
        self.log = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [shutil.which("podman"), "build", "--format", "docker", "--secret", f"id=pip-ca,src={ca_bundle}",
             *[arg for tag in tags for arg in ("-t", tag)], str(context)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})

    def wait(self) -> str:
        """The first tag, once built; the build's output if it failed."""
        try:
            returncode = self.process.wait(timeout=max(1.0, BUILD_TIMEOUT_SECONDS - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        if returncode != 0:
            self.log.seek(0)
            output = self.log.read().decode(errors="replace")
            raise AssertionError(f"podman build {self.context} failed:\n{output[-5000:]}")
        return self.tags[0]


@pytest.fixture(scope="session")
def builds():
    """Every image the tests need, built at once: the pgscout image is mostly compiling (CPU),
    the others mostly downloading Debian and PyPI packages, so they overlap well."""
    assert shutil.which("podman"), "podman is missing: install Debian's podman, buildah and runc (.ci/run does)"
    ensure_base_image()
    demo_app = yaml.safe_load((REPO_ROOT / "deploy/docker-compose.yml").read_text())["services"]["demo-app"]["build"]
    started = {
        "pgscout": Build(REPO_ROOT, IMAGE, COMPOSE_PGSCOUT_IMAGE),
        "demo-app": Build(REPO_ROOT / "deploy" / demo_app, COMPOSE_DEMO_APP_IMAGE),
        "postgres": Build(STANDINS / "postgres", "localhost/pgscout-standin-postgres:test"),
        "prometheus": Build(STANDINS / "prometheus", "localhost/pgscout-standin-prometheus:test"),
    }
    yield started
    for build in started.values():
        build.process.wait(timeout=BUILD_TIMEOUT_SECONDS)  # never leave a build half-written


@pytest.fixture(scope="session")
def image(builds) -> str:
    started = time.monotonic()
    built = builds["pgscout"].wait()
    print(f"\nimage {built} ready in {time.monotonic() - started:.0f} s")
    return built


def inspect(name: str) -> dict:
    return json.loads(podman("inspect", name).stdout)[0]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Container:
    """One `podman run -d` of the image; removed (with -f) at cleanup."""

    def __init__(self, image: str, *options: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.name = f"pgscout-test-{secrets.token_hex(4)}"
        env_options = [item for key, value in (env or {}).items() for item in ("-e", f"{key}={value}")]
        podman("run", "-d", "--name", self.name, *options, *env_options, image, *args)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def log_events(self) -> list[dict]:
        events = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, check=False)

    def healthcheck(self) -> int:
        """`podman healthcheck run`: the image's HEALTHCHECK command, once (podman schedules none here)."""
        return podman("healthcheck", "run", self.name, check=False, timeout=30).returncode

    def running(self) -> bool:
        return inspect(self.name)["State"]["Running"]

    def failure_report(self) -> list[tuple[str, str]]:
        return [(f"container {self.name}", self.logs()[-6000:])]

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


class ProxyContainer(Container):
    """The image in the host's network namespace, listening on free loopback ports, in front of
    the test PostgreSQL, with the manifests' security settings."""

    def __init__(self, image: str, pg):
        self.port, self.admin_port = free_port(), free_port()
        super().__init__(image, "--network", "host", *RESTRICTED, env={
            "PGSCOUT_PROXY_LISTEN": f"127.0.0.1:{self.port}",
            "PGSCOUT_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "PGSCOUT_PROXY_UPSTREAM": pg.upstream_url(),
            "PGSCOUT_LOG_FORMAT": "json",
        })
        ready = wait_until(lambda: self._ready(), timeout=30, interval=0.2)
        assert ready, f"pgscout in {self.name} did not become ready:\n{self.logs()[-3000:]}"

    def _ready(self) -> bool:
        assert self.running(), f"{self.name} exited:\n{self.logs()[-3000:]}"
        try:
            return http_get(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1)[0] == 200
        except OSError:
            return False

    def dsn(self, user: str = "trust_user", db: str = APP_DATABASE, **params: object) -> str:
        params.setdefault("sslmode", "disable")
        params.setdefault("connect_timeout", 10)
        return make_dsn("127.0.0.1", self.port, user, db, None, **params)


class Started(list):
    """The containers a test started: removed after it, their logs attached to its failure."""

    def failure_report(self) -> list[tuple[str, str]]:
        return [section for container in self for section in container.failure_report()]


@pytest.fixture
def containers():
    started = Started()
    yield started
    for container in started:
        container.remove()


@pytest.fixture(scope="module")
def proxy_container(image, pg):
    container = ProxyContainer(image, pg)
    try:
        yield container
    finally:
        container.remove()


# -- the image ---------------------------------------------------------------------------------

def test_image_runs_unprivileged_with_the_compiled_decoder_and_a_healthcheck(image):
    details = inspect(image)
    assert details["Config"]["User"] == IMAGE_USER
    assert details["Config"]["Entrypoint"] == ["pgscout"]
    # Kept only by the docker format (podman build --format docker).
    assert details["Healthcheck"]["Test"][0] == "CMD"
    # From /, where no source tree can shadow the installed package: mypyc's build is what runs.
    result = podman("run", "--rm", "--entrypoint", "python3", image, "-c",
                    "import os, pgscout.dataplane.decoder as d; print(os.getuid(), d.__file__)")
    uid, decoder = result.stdout.split()
    assert uid == IMAGE_USER and decoder.endswith(".so"), result.stdout
    # No compiler, no build secret, no pip settings of the build host in the final image.
    leftovers = podman("run", "--rm", "--entrypoint", "sh", image, "-c",
                       "command -v gcc cc; ls /run/secrets /etc/pip.conf 2>/dev/null; true").stdout
    assert not leftovers.strip(), leftovers


def test_proxies_psycopg_like_the_database_under_the_manifests_security_settings(proxy_container, pg):
    assert inspect(proxy_container.name)["HostConfig"]["ReadonlyRootfs"] is True
    # What the kernel applies to pgscout (PID 1): no new privileges, no capability, uid 10001.
    status = proxy_container.exec("cat", "/proc/1/status").stdout
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    assert re.search(rf"^Uid:\s+{IMAGE_USER}\b", status, re.M), status
    assert proxy_container.exec("touch", "/etc/pgscout/x").returncode != 0
    # The runtime's default seccomp filter lets the analysis process (PID 1's one child) give
    # the CPU away: SCHED_IDLE, the policy field of /proc/<pid>/stat (the 39th after the name).
    [analysis] = proxy_container.exec("cat", "/proc/1/task/1/children").stdout.split()
    stat = proxy_container.exec("cat", f"/proc/{analysis}/stat").stdout
    assert int(stat.rsplit(")", 1)[1].split()[38]) == os.SCHED_IDLE, stat

    results = {}
    for route, dsn in {"direct": pg.dsn("trust_user", APP_DATABASE), "proxy": proxy_container.dsn()}.items():
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("DROP TABLE IF EXISTS container_items")
            connection.execute("CREATE TABLE container_items (id int PRIMARY KEY, name text)")
            with connection.cursor() as cursor:
                cursor.executemany("INSERT INTO container_items VALUES (%s, %s)", [(i, f"item {i}") for i in range(50)])
            rows = connection.execute("SELECT id, name FROM container_items WHERE id < %s ORDER BY id", (10,)).fetchall()
            with pytest.raises(psycopg.errors.UniqueViolation) as error:
                connection.execute("INSERT INTO container_items VALUES (1, 'again')")
            results[route] = (rows, error.value.sqlstate, str(error.value))
    assert results["proxy"] == results["direct"]
    # Nothing in the image needed a writable root filesystem.
    assert proxy_container.running()
    assert not [event for event in proxy_container.log_events() if event.get("level") == "error"]


def test_metrics_count_the_statements_it_relayed(proxy_container):
    with psycopg.connect(proxy_container.dsn(application_name="container-metrics"), autocommit=True) as connection:
        for _ in range(5):
            connection.execute("SELECT 1")

    def counted() -> float:
        status, body = http_get(f"http://127.0.0.1:{proxy_container.admin_port}/metrics")
        assert status == 200
        values = re.findall(r'^pgscout_statements_total\{[^}]*application="container-metrics"[^}]*\} (\S+)$', body, re.M)
        return sum(float(value) for value in values)

    assert wait_until(lambda: counted() >= 5, timeout=10, interval=0.2), counted()


def test_healthcheck_follows_the_admin_port_the_container_was_given(proxy_container, image, containers):
    # The manifests' container: admin on a non-default loopback port, probed there.
    assert proxy_container.healthcheck() == 0
    # The image's defaults in its own network namespace (0.0.0.0 there is that namespace only):
    # healthy, and the start-up log warns that the admin port has no token.
    plain = Container(image, env={"PGSCOUT_PROXY_UPSTREAM": "postgresql://db.invalid:5432/app"})
    containers.append(plain)
    assert wait_until(lambda: plain.healthcheck() == 0, timeout=30, interval=0.5), plain.logs()
    warnings = [event for event in plain.log_events() if event.get("event") == "admin_exposed_without_token"]
    assert len(warnings) == 1 and warnings[0]["listen"] == "0.0.0.0:9434", plain.logs()
    # With a token: no warning (nor on the loopback admin of the manifests' container).
    guarded = Container(image, env={"PGSCOUT_PROXY_UPSTREAM": "postgresql://db.invalid:5432/app",
                                    "PGSCOUT_ADMIN_TOKEN": "s3cret"})
    containers.append(guarded)
    assert wait_until(lambda: guarded.healthcheck() == 0, timeout=30, interval=0.5), guarded.logs()
    assert "admin_exposed_without_token" not in guarded.logs()
    assert "admin_exposed_without_token" not in proxy_container.logs()
    # The probe fails where nothing answers: the image's HEALTHCHECK in a container running no pgscout.
    idle = Container(image, "--entrypoint", "sleep", args=("60",))
    containers.append(idle)
    assert idle.healthcheck() != 0


def test_sigterm_drains_an_open_transaction_then_exits_zero(image, pg, containers):
    container = ProxyContainer(image, pg)
    containers.append(container)
    with psycopg.connect(pg.dsn("trust_user", APP_DATABASE), autocommit=True) as direct:
        direct.execute("DROP TABLE IF EXISTS container_drain")
        direct.execute("CREATE TABLE container_drain (id int)")
    session = psycopg.connect(container.dsn())
    session.execute("INSERT INTO container_drain VALUES (1)")
    started = time.monotonic()
    podman("kill", "--signal", "TERM", container.name)
    # Draining: unready at once, no new sessions, the open one carries on.
    assert wait_until(lambda: http_get(f"http://127.0.0.1:{container.admin_port}/readyz", timeout=1)[0] == 503,
                      timeout=5, interval=0.1)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(container.dsn(), connect_timeout=3).close()
    session.execute("INSERT INTO container_drain VALUES (2)")
    session.commit()
    session.close()
    exit_code = podman("wait", container.name, timeout=40).stdout.strip()
    assert exit_code == "0", container.logs()
    assert time.monotonic() - started < 30  # closed when the last session ended, not at the timeout
    with psycopg.connect(pg.dsn("trust_user", APP_DATABASE)) as direct:
        assert direct.execute("SELECT id FROM container_drain ORDER BY id").fetchall() == [(1,), (2,)]


# -- the compose stack ---------------------------------------------------------------------------

def podman_compose(project: str, files: list[Path], *args: str, check: bool = True,
                   timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "podman_compose", "-p", project]
    for path in files:
        command += ["-f", str(path)]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=REPO_ROOT / "deploy",
                            env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)})
    if check:
        assert result.returncode == 0, f"podman-compose {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


class YamlTag:
    """A YAML value written with a tag (compose's `!override`)."""

    def __init__(self, tag: str, value: object):
        self.tag, self.value = tag, value


yaml.SafeDumper.add_representer(YamlTag, lambda dumper, data: dumper.represent_sequence(data.tag, data.value))


@pytest.mark.slow
def test_compose_stack_prometheus_scrapes_pgscout_and_loads_the_rules(image, builds, tmp_path):
    compose_file = REPO_ROOT / "deploy" / "docker-compose.yml"
    compose = yaml.safe_load(compose_file.read_text())
    for name in ("demo-app", "postgres", "prometheus"):
        builds[name].wait()
    # The override swaps in the stand-ins for the two public images and publishes every port on a
    # free loopback port (what the file publishes may be taken on a shared machine).
    published = {}
    override = {"services": {
        "postgres": {"image": builds["postgres"].tags[0]},
        "prometheus": {"image": builds["prometheus"].tags[0]},
    }}
    for name, service in compose["services"].items():
        if name == "grafana" or not service.get("ports"):
            continue
        ports = []
        for mapping in service["ports"]:
            container_port = mapping.rsplit(":", 1)[1]
            published[container_port] = free_port()
            ports.append(f"127.0.0.1:{published[container_port]}:{container_port}")
        override["services"].setdefault(name, {})["ports"] = YamlTag("!override", ports)
    override_file = tmp_path / "override.yml"
    override_file.write_text(yaml.safe_dump(override))
    files = [compose_file, override_file]
    project = f"pgscout-test-{os.getpid()}"
    services = [name for name in compose["services"] if name != "grafana"]
    containers = {name: f"{project}_{name}_1" for name in services}
    admin_port = compose["services"]["pgscout"]["environment"]["PGSCOUT_ADMIN_LISTEN"].rsplit(":", 1)[1]
    prometheus_url = f"http://127.0.0.1:{published['9090']}"
    started = time.monotonic()
    try:
        podman_compose(project, files, "up", "-d", "--no-build", *services)
        # podman here runs no health checks of its own: run each service's, as compose would.
        for name in ("postgres", "pgscout"):
            assert wait_until(lambda: podman("healthcheck", "run", containers[name], check=False).returncode == 0,
                              timeout=60, interval=1), f"{name} never healthy:\n{podman('logs', containers[name], check=False).stderr[-3000:]}"

        def prometheus(path: str) -> dict:
            status, body = http_get(f"{prometheus_url}/api/v1/{path}", timeout=5)
            assert status == 200, body
            return json.loads(body)["data"]

        def pgscout_target_up() -> bool:
            try:
                targets = prometheus("targets")["activeTargets"]
            except OSError:
                return False
            return any(target["labels"]["job"] == "pgscout" and target["health"] == "up"
                       and target["scrapeUrl"] == f"http://pgscout:{admin_port}/metrics" for target in targets)

        # Prometheus's scrape interval in the compose file is 15 s.
        assert wait_until(pgscout_target_up, timeout=90, interval=1), prometheus("targets")
        expected = {rule["alert"] for group in yaml.safe_load(
            (REPO_ROOT / "deploy/prometheus/rules/pgscout-alerts.yml").read_text())["groups"] for rule in group["rules"]}

        def loaded_rules() -> dict:
            return {rule["name"]: rule for group in prometheus("rules")["groups"] for rule in group["rules"]}

        # A rule's health is "unknown" until its group's first evaluation (every 15 s).
        assert wait_until(lambda: all(rule["health"] == "ok" for rule in loaded_rules().values()),
                          timeout=60, interval=1), loaded_rules()
        assert set(loaded_rules()) == expected

        # The demo app's lazy-loading page, driven by the traffic service, reached Prometheus as
        # statements and N+1 findings of application demo-app.
        def scraped(expression: str) -> bool:
            status, body = http_get(f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expression}))
            return status == 200 and bool(json.loads(body)["data"]["result"])

        # First in pgscout's own API (the detector's verdict: the first occurrence is emitted as
        # soon as the second lazy page closes the first one's group), then in Prometheus, whose
        # next scrapes (every 15 s) carry the counter: a failure says which of the two it was.
        def demo_app_loops() -> list[dict]:
            status, body = http_get(f"http://127.0.0.1:{published[admin_port]}/api/nplusone")
            assert status == 200, body
            return [finding for finding in json.loads(body)["findings"]
                    if finding["application_name"] == "demo-app" and finding["kind"] == "n_plus_one"]

        assert wait_until(demo_app_loops, timeout=60, interval=1), \
            podman("logs", containers["pgscout"], check=False).stdout[-3000:]
        assert wait_until(lambda: scraped('sum(pgscout_nplusone_findings_total{application="demo-app", finding="n_plus_one"}) > 0'),
                          timeout=45, interval=1), prometheus("targets")
        assert scraped('sum(pgscout_statements_total{application="demo-app"}) > 0')

        # The demo containers stop on SIGTERM (Python as PID 1 used to ignore it until SIGKILL).
        for name in ("traffic", "demo-app"):
            before = time.monotonic()
            podman("stop", "-t", "20", containers[name], timeout=60)
            assert time.monotonic() - before < 10, f"{name} ignored SIGTERM"
            assert inspect(containers[name])["State"]["ExitCode"] == 143, name
        print(f"\ncompose stack: up, scraped and checked in {time.monotonic() - started:.0f} s")
    finally:
        podman_compose(project, files, "down", "-t", "5", check=False, timeout=180)
