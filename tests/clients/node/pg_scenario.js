// node-postgres driving PostgreSQL the way Node services do, for tests/test_clients_node.py.
//
// Owns: what it sends and prints: unnamed and named prepared statements, array row mode, types,
// errors inside and outside a transaction, a multi-statement query, a 3 MB value, COPY in and out
// (pg-copy-streams), LISTEN/NOTIFY and a statement_timeout cancel, so the output directly and
// through pgscout can be compared line by line.
// Must not: print anything that differs between two runs against the same server (times, pids;
// the table name TABLE is replaced by the test).
const { Client } = require('pg');
const { from: copyFrom, to: copyTo } = require('pg-copy-streams');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');

const [url, t] = process.argv.slice(2);

async function step(name, fn) {
  console.log(`== ${name}`);
  try { await fn(); } catch (e) { console.log(`ERR ${e.code} ${e.message}`); }
}

(async () => {
  const c = new Client({ connectionString: url });
  await c.connect();
  const show = (r) => console.log(JSON.stringify(r.rows), r.command, r.rowCount);
  await step('setup', async () => {
    await c.query(`drop table if exists ${t}`);
    await c.query(`create table ${t} (id int primary key, name text, amount numeric, at timestamptz, data bytea, tags text[])`);
  });
  await step('parameterized inserts', async () => {
    for (let i = 0; i < 8; i++) {
      show(await c.query(`insert into ${t} values ($1, $2, $3, $4, $5, $6)`,
        [i, `name${i}`, `${i}.25`, new Date(1700000000000 + i * 1000), Buffer.from([i, 0, 255]), [`a${i}`, null]]));
    }
  });
  await step('named prepared statement', async () => {
    for (let i = 0; i < 6; i++) {
      show(await c.query({ name: 'by_id', text: `select id, name, amount, at, data, tags from ${t} where id = $1`, values: [i] }));
    }
  });
  await step('array row mode', async () => {
    const r = await c.query({ text: `select id, name from ${t} order by id`, rowMode: 'array' });
    console.log(JSON.stringify(r.rows), JSON.stringify(r.fields.map((f) => f.name)));
  });
  await step('error outside a transaction', async () => { await c.query('select 1/0'); });
  await step('after the error', async () => show(await c.query('select $1::text as v', ['ok'])));
  await step('error inside a transaction', async () => {
    await c.query('begin');
    try { await c.query(`insert into ${t} (id) values (1)`); } catch (e) { console.log(`dup ${e.code}`); }
    try { await c.query('select 1'); } catch (e) { console.log(`aborted ${e.code}`); }
    show(await c.query('rollback'));
  });
  await step('committed transaction', async () => {
    await c.query('begin');
    await c.query(`insert into ${t} (id, name) values (100, 'tx')`);
    await c.query('savepoint s1');
    try { await c.query(`insert into ${t} (id) values (100)`); } catch (e) { console.log(`dup ${e.code}`); }
    await c.query('rollback to savepoint s1');
    show(await c.query('commit'));
    show(await c.query(`select count(*) from ${t}`));
  });
  await step('multi-statement query', async () => {
    const rs = await c.query(`select 1 as a; update ${t} set name = 'u' where id < 3; select 'x' as b`);
    for (const r of rs) show(r);
  });
  await step('large values', async () => {
    const big = 'x'.repeat(3000000);
    show(await c.query('select length($1::text) as n, md5($1::text) as h', [big]));
    const r = await c.query("select repeat('y', 2000000) as v");
    console.log(r.rows[0].v.length);
  });
  await step('copy in and out', async () => {
    const lines = [];
    for (let i = 2000; i < 2500; i++) lines.push(`${i}\tc${i}\n`);
    const into = c.query(copyFrom(`copy ${t} (id, name) from stdin`));
    await pipeline(Readable.from(lines), into);
    console.log(into.rowCount);
    const chunks = [];
    await pipeline(c.query(copyTo(`copy (select id, name from ${t} where id >= 2495 order by id) to stdout`)),
      new Writable({ write(chunk, _, done) { chunks.push(chunk); done(); } }));
    process.stdout.write(Buffer.concat(chunks).toString());
  });
  await step('listen notify', async () => {
    const got = new Promise((resolve) => c.once('notification', resolve));
    await c.query('listen node_chan');
    await c.query("notify node_chan, 'hello'");
    const n = await got;
    console.log(n.channel, n.payload);
  });
  await step('statement timeout', async () => {
    await c.query("set statement_timeout = '300ms'");
    await c.query('select pg_sleep(3)');
  });
  await step('after the timeout', async () => { await c.query('reset statement_timeout'); show(await c.query('select 42 as v')); });
  await step('syntax error', async () => { await c.query('selec 1'); });
  await step('drop', async () => { await c.query(`drop table ${t}`); });
  await c.end();
  console.log('== done');
})();
