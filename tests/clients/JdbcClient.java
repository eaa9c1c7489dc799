import java.io.*;
import java.sql.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

/**
 * pgJDBC driving PostgreSQL the way Java services do, for tests/test_clients_jdbc.py.
 *
 * Owns: what each mode sends and prints. `scenario URL TABLE` runs every protocol feature the
 * driver uses (server-side prepared statements from the fifth execution, batches with one Sync,
 * fetch-size cursors, CopyManager, savepoints, query timeouts and Statement.cancel, schema changes
 * under a cached plan, DISCARD ALL and DEALLOCATE ALL) and prints what the application sees, so
 * the output directly and through pgscout can be compared line by line. `loop URL` and `any URL`
 * load each np_authors row's np_books one query at a time, and all at once.
 * Must not: print anything that differs between two runs against the same server (times, pids,
 * table names: the caller's TABLE is replaced by the test).
 */
public class JdbcClient {
    static PrintStream out = System.out;

    static void dump(ResultSet rs) throws SQLException {
        ResultSetMetaData md = rs.getMetaData();
        while (rs.next()) {
            StringBuilder sb = new StringBuilder();
            for (int i = 1; i <= md.getColumnCount(); i++) {
                if (i > 1) sb.append('|');
                sb.append(md.getColumnTypeName(i)).append('=').append(rs.getString(i));
            }
            out.println(sb);
        }
    }

    static void step(String name, Conn c) {
        out.println("== " + name);
        try { c.run(); } catch (Exception e) { out.println("EXC " + e.getClass().getSimpleName() + " " + sqlState(e) + " " + e.getMessage().split("\n")[0]); }
    }
    static String sqlState(Exception e) { return e instanceof SQLException ? ((SQLException) e).getSQLState() : "-"; }
    interface Conn { void run() throws Exception; }

    public static void main(String[] args) throws Exception {
        String url = args[1];
        switch (args[0]) {
            case "scenario": scenario(url, args[2]); break;
            case "loop": authorsThenBooks(url, false); break;
            case "any": authorsThenBooks(url, true); break;
            default: throw new IllegalArgumentException(args[0]);
        }
    }

    /** A controller's page: the authors, then each author's books (N+1), or all books at once. */
    static void authorsThenBooks(String url, boolean atOnce) throws SQLException {
        try (Connection c = DriverManager.getConnection(url)) {
            List<Integer> ids = new ArrayList<>();
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT id, name FROM np_authors ORDER BY id")) {
                while (rs.next()) ids.add(rs.getInt(1));
            }
            int books = 0;
            if (atOnce) {
                try (PreparedStatement ps = c.prepareStatement("SELECT id, title FROM np_books WHERE author_id = ANY(?) ORDER BY id")) {
                    ps.setArray(1, c.createArrayOf("int4", ids.toArray()));
                    try (ResultSet rs = ps.executeQuery()) { while (rs.next()) books++; }
                }
            } else {
                try (PreparedStatement ps = c.prepareStatement("SELECT id, title FROM np_books WHERE author_id = ? ORDER BY id")) {
                    for (int id : ids) {
                        ps.setInt(1, id);
                        try (ResultSet rs = ps.executeQuery()) { while (rs.next()) books++; }
                    }
                }
            }
            out.println(ids.size() + " authors, " + books + " books");
        }
    }

    static void scenario(String url, String t) throws Exception {
        try (Connection c = DriverManager.getConnection(url)) {
            Statement s = c.createStatement();
            step("setup", () -> {
                s.execute("drop table if exists " + t);
                s.execute("create table " + t + " (id int primary key, name text, amount numeric, at timestamptz, data bytea, tags text[])");
            });
            step("prepared past threshold (named statements from the 5th)", () -> {
                try (PreparedStatement ps = c.prepareStatement("insert into " + t + " values (?, ?, ?, ?, ?, ?)")) {
                    for (int i = 0; i < 12; i++) {
                        ps.setInt(1, i); ps.setString(2, "name" + i); ps.setBigDecimal(3, new java.math.BigDecimal(i + ".25"));
                        ps.setTimestamp(4, new Timestamp(1700000000000L + i * 1000L)); ps.setBytes(5, new byte[]{(byte) i, 0, (byte) 255});
                        ps.setArray(6, c.createArrayOf("text", new String[]{"a" + i, null}));
                        out.println(ps.executeUpdate());
                    }
                }
            });
            step("select prepared loop", () -> {
                try (PreparedStatement ps = c.prepareStatement("select id, name, amount, at, data, tags from " + t + " where id = ?")) {
                    for (int i = 0; i < 8; i++) { ps.setInt(1, i); try (ResultSet rs = ps.executeQuery()) { dump(rs); } }
                }
            });
            step("batch", () -> {
                try (PreparedStatement ps = c.prepareStatement("insert into " + t + " (id, name) values (?, ?)")) {
                    for (int i = 100; i < 300; i++) { ps.setInt(1, i); ps.setString(2, "b" + i); ps.addBatch(); }
                    out.println(Arrays.toString(ps.executeBatch()));
                }
            });
            step("batch with a failing row", () -> {
                try (PreparedStatement ps = c.prepareStatement("insert into " + t + " (id, name) values (?, ?)")) {
                    for (int i = 300; i < 310; i++) { ps.setInt(1, i == 305 ? 100 : i); ps.setString(2, "b" + i); ps.addBatch(); }
                    ps.executeBatch();
                } catch (BatchUpdateException e) {
                    out.println("batch exc " + e.getSQLState() + " " + Arrays.toString(e.getUpdateCounts()));
                }
            });
            step("count", () -> { try (ResultSet rs = s.executeQuery("select count(*) from " + t)) { dump(rs); } });
            step("transaction with savepoint and error", () -> {
                c.setAutoCommit(false);
                s.execute("insert into " + t + " (id) values (1000)");
                Savepoint sp = c.setSavepoint("sp1");
                try { s.execute("insert into " + t + " (id) values (1000)"); } catch (SQLException e) { out.println("dup " + e.getSQLState()); c.rollback(sp); }
                s.execute("insert into " + t + " (id) values (1001)");
                c.commit();
                c.setAutoCommit(true);
                try (ResultSet rs = s.executeQuery("select id from " + t + " where id >= 1000 order by id")) { dump(rs); }
            });
            step("error aborts transaction", () -> {
                c.setAutoCommit(false);
                try { s.execute("select 1/0"); } catch (SQLException e) { out.println("div " + e.getSQLState()); }
                try { s.execute("select 1"); } catch (SQLException e) { out.println("aborted " + e.getSQLState()); }
                c.rollback();
                c.setAutoCommit(true);
            });
            step("fetch size cursor (portal suspended)", () -> {
                c.setAutoCommit(false);
                try (PreparedStatement ps = c.prepareStatement("select id, name from " + t + " order by id")) {
                    ps.setFetchSize(7);
                    int n = 0; long sum = 0;
                    try (ResultSet rs = ps.executeQuery()) { while (rs.next()) { n++; sum += rs.getInt(1); } }
                    out.println(n + " " + sum);
                }
                c.commit();
                c.setAutoCommit(true);
            });
            step("copy in and out", () -> {
                CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
                StringBuilder sb = new StringBuilder();
                for (int i = 2000; i < 2500; i++) sb.append(i).append("\tc").append(i).append('\n');
                out.println(cm.copyIn("copy " + t + " (id, name) from stdin", new StringReader(sb.toString())));
                StringWriter w = new StringWriter();
                out.println(cm.copyOut("copy (select id, name from " + t + " where id >= 2490 order by id) to stdout", w));
                out.print(w);
                try { cm.copyIn("copy " + t + " (id, name) from stdin", new StringReader("1\tdup\n")); } catch (SQLException e) { out.println("copy dup " + e.getSQLState()); }
            });
            step("multi statement simple", () -> {
                boolean rs = s.execute("select 1 as a; select 2 as b, 'x' as c; update " + t + " set name = 'u' where id < 3");
                do {
                    if (rs) { dump(s.getResultSet()); } else { out.println("count " + s.getUpdateCount()); }
                    rs = s.getMoreResults();
                } while (rs || s.getUpdateCount() != -1);
            });
            step("query timeout (cancel)", () -> {
                try (Statement st = c.createStatement()) { st.setQueryTimeout(1); st.execute("select pg_sleep(5)"); }
            });
            step("after cancel", () -> { try (ResultSet rs = s.executeQuery("select 42")) { dump(rs); } });
            step("explicit cancel from another thread", () -> {
                Statement st = c.createStatement();
                Thread th = new Thread(() -> { try { Thread.sleep(300); st.cancel(); } catch (Exception e) { } });
                th.start();
                try { st.execute("select pg_sleep(5)"); } finally { th.join(); }
            });
            step("schema change under a prepared statement", () -> {
                try (PreparedStatement ps = c.prepareStatement("select * from " + t + " where id = ?")) {
                    for (int i = 0; i < 6; i++) { ps.setInt(1, 1); try (ResultSet rs = ps.executeQuery()) { rs.next(); out.println(rs.getMetaData().getColumnCount()); } }
                    s.execute("alter table " + t + " add column extra int default 7");
                    for (int i = 0; i < 2; i++) { ps.setInt(1, 1); try (ResultSet rs = ps.executeQuery()) { rs.next(); out.println(rs.getMetaData().getColumnCount() + " " + rs.getString("extra")); } }
                }
            });
            step("listen notify", () -> {
                s.execute("listen jdbc_chan");
                s.execute("notify jdbc_chan, 'hello'");
                s.execute("select 1");
                for (org.postgresql.PGNotification n : c.unwrap(PGConnection.class).getNotifications()) out.println(n.getName() + " " + n.getParameter());
            });
            step("metadata", () -> {
                try (ResultSet rs = c.getMetaData().getColumns(null, "public", t, null)) {
                    while (rs.next()) out.println(rs.getString("COLUMN_NAME") + " " + rs.getString("TYPE_NAME"));
                }
            });
            step("large values", () -> {
                try (PreparedStatement ps = c.prepareStatement("select length(?::text), md5(?::text)")) {
                    String big = "x".repeat(3_000_000);
                    ps.setString(1, big); ps.setString(2, big);
                    try (ResultSet rs = ps.executeQuery()) { dump(rs); }
                }
                try (ResultSet rs = s.executeQuery("select repeat('y', 2000000) as v")) { rs.next(); out.println(rs.getString(1).length()); }
            });
            step("syntax error", () -> s.execute("selec 1"));
            step("unknown statement after error", () -> { try (ResultSet rs = s.executeQuery("select 'ok'")) { dump(rs); } });
            step("generated keys", () -> {
                s.execute("create temp table g (id serial primary key, v text)");
                try (PreparedStatement ps = c.prepareStatement("insert into g (v) values (?)", Statement.RETURN_GENERATED_KEYS)) {
                    ps.setString(1, "a"); ps.executeUpdate();
                    try (ResultSet rs = ps.getGeneratedKeys()) { dump(rs); }
                }
            });
            step("discard all", () -> { s.execute("discard all"); try (PreparedStatement ps = c.prepareStatement("select ?::int + 1")) { for (int i = 0; i < 7; i++) { ps.setInt(1, i); try (ResultSet rs = ps.executeQuery()) { dump(rs); } } } });
            step("deallocate all then reuse", () -> {
                try (PreparedStatement ps = c.prepareStatement("select ?::int * 2")) {
                    for (int i = 0; i < 6; i++) { ps.setInt(1, i); try (ResultSet rs = ps.executeQuery()) { dump(rs); } }
                    s.execute("deallocate all");
                    for (int i = 0; i < 2; i++) { ps.setInt(1, i); try (ResultSet rs = ps.executeQuery()) { dump(rs); } }
                }
            });
            step("drop", () -> s.execute("drop table " + t));
        }
        out.println("== done");
    }
}
