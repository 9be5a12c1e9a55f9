"""The object diff's rules, on pre/post object pairs compiled here from small C files."""

import subprocess
import textwrap


from livesplice.elfmodel import ObjectFile, base_name
from livesplice.objdiff import diff_objects

CFLAGS = ["-O2", "-c", "-ffunction-sections", "-fdata-sections", "-fno-pie", "-mcmodel=kernel",
          "-pg", "-mfentry", "-mrecord-mcount", "-fno-asynchronous-unwind-tables", "-w"]

PRELUDE = """
#define __init __attribute__((__section__(".init.text"))) __attribute__((cold))
#define noinline __attribute__((noinline))
void __might_sleep(const char *file, int line);
int printk(const char *fmt, ...);
extern int sink;
"""


def compile_pair(tmp_path, pre: str, post: str):
    objs = []
    for tag, src in (("pre", pre), ("post", post)):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "t.c").write_text(PRELUDE + textwrap.dedent(src))
        # The same file name in both builds, as in a kernel tree: __FILE__ must not differ.
        subprocess.run(["gcc", *CFLAGS, "t.c", "-o", "t.o"], cwd=tmp_path / tag, check=True)
        objs.append(ObjectFile(tmp_path / tag / "t.o"))
    return diff_objects(objs[0], objs[1], "t.o")


def names(changes):
    return sorted(c.name for c in changes)


def test_base_name():
    assert base_name("foo.isra.0") == "foo.isra.N"
    assert base_name("foo.constprop.12.isra.0") == "foo.constprop.N.isra.N"
    assert base_name("rs.7") == "rs.N"
    assert base_name("foo.cold") == "foo.cold"


def test_unchanged(tmp_path):
    src = "int f(int x) { return x * 3 + sink; }\nint g(int x) { return f(x) + 1; }\n"
    d = compile_pair(tmp_path, src, src)
    assert not d.has_changes and not d.refusals


def test_changed_body(tmp_path):
    d = compile_pair(tmp_path,
                     "int f(int x) { if (x < 0 || x > 2) return -22; return x; }\n"
                     "int g(int x) { return x + 1; }\n",
                     "int f(int x) { if (x < 0 || x > 1) return -22; return x; }\n"
                     "int g(int x) { return x + 1; }\n")
    assert names(d.changed) == ["f"] and not d.new and not d.refusals


def test_changed_callee_only(tmp_path):
    pre = "noinline int h(int x) { return x + sink; }\nint f(int x) { return h(x) * 2; }\n"
    post = "noinline int h(int x) { return x - sink; }\nint f(int x) { return h(x) * 2; }\n"
    d = compile_pair(tmp_path, pre, post)
    assert names(d.changed) == ["h"]


def test_inlined_callee_changes_its_caller(tmp_path):
    pre = "static inline int h(int x) { return x + 7; }\nint f(int x) { return h(x) * 2; }\n"
    post = "static inline int h(int x) { return x + 8; }\nint f(int x) { return h(x) * 2; }\n"
    d = compile_pair(tmp_path, pre, post)
    assert names(d.changed) == ["f"]


def test_clones_are_correlated_not_new(tmp_path):
    # A static function with a constant argument gets a .constprop/.isra clone.
    body = """
    static noinline int work(int *p, int k) { int s = 0; for (int i = 0; i < k; i++) s += p[i] * %d; return s; }
    int a(int *p) { return work(p, 16); }
    int b(int *p) { return work(p, 16) + 1; }
    """
    d = compile_pair(tmp_path, body % 3, body % 5)
    assert len(d.changed) == 1 and not d.new
    assert d.changed[0].name != "work"  # the clone, e.g. work.constprop.0
    assert base_name(d.changed[0].name).startswith("work.")


def test_line_shift_is_not_a_change(tmp_path):
    pre = "int f(int x) { __might_sleep(__FILE__, __LINE__); return x + 1; }\n"
    post = "\n\n\n" + pre
    d = compile_pair(tmp_path, pre, post)
    assert not d.changed and d.line_only == ["f"]


def test_static_local_variable(tmp_path):
    pre = "int count(void) { static int n; return ++n; }\nint other(void) { static int n; return n--; }\n"
    post = "int count(void) { static int n; return n += 2; }\nint other(void) { static int n; return n--; }\n"
    d = compile_pair(tmp_path, pre, post)
    assert names(d.changed) == ["count"] and not d.refusals and not d.new_data
    assert d.names["n.1"] == "n.1" or len({v for k, v in d.names.items() if k.startswith("n.")}) == 2


def test_new_function_and_string(tmp_path):
    pre = "int f(int x) { return printk(\"a %d\\n\", x); }\n"
    post = ("noinline int helper(int x) { return printk(\"new string %d\\n\", x); }\n"
            "int f(int x) { return helper(x) + printk(\"a %d\\n\", x); }\n")
    d = compile_pair(tmp_path, pre, post)
    assert names(d.changed) == ["f"] and names(d.new) == ["helper"] and not d.refusals


def test_changed_data_is_refused(tmp_path):
    pre = "int table[4] = {1, 2, 3, 4};\nint f(int i) { return table[i]; }\n"
    post = "int table[4] = {1, 2, 3, 5};\nint f(int i) { return table[i]; }\n"
    d = compile_pair(tmp_path, pre, post)
    assert any("changed data object table" in r for r in d.refusals)


def test_changed_data_size_is_refused(tmp_path):
    pre = "int buf[4];\nint f(int i) { return buf[i]; }\n"
    post = "int buf[8];\nint f(int i) { return buf[i]; }\n"
    d = compile_pair(tmp_path, pre, post)
    assert any("changed data object buf" in r and "size 16 -> 32" in r for r in d.refusals)


def test_changed_init_is_refused(tmp_path):
    pre = "int __init setup(void) { sink = 1; return 0; }\nint f(void) { return sink; }\n"
    post = "int __init setup(void) { sink = 2; return 0; }\nint f(void) { return sink; }\n"
    d = compile_pair(tmp_path, pre, post)
    assert any("changed __init function setup" in r for r in d.refusals)
    assert not d.changed
