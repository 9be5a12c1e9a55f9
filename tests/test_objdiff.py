"""The object diff's rules, on pre/post object pairs compiled here from small C files."""

import re
import subprocess
import textwrap
from pathlib import Path

import pytest

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


def compile_one(tmp_path, src: str) -> ObjectFile:
    (tmp_path / "t.c").write_text(PRELUDE + textwrap.dedent(src))
    subprocess.run(["gcc", *CFLAGS, "t.c", "-o", "t.o"], cwd=tmp_path, check=True)
    return ObjectFile(tmp_path / "t.o")


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


def test_changed_local_const_table_is_copied(tmp_path):
    # Only this object can reach a static const table: the new code gets its own copy, and
    # every function that reads it is changed (also one whose own code did not change).
    src = ("static const int table[4] = {1, 2, 3, %d};\n"
           "int f(int i) { return table[i & 3]; }\nint g(int i) { return table[(i + 1) & 3]; }\n"
           "int h(int i) { return i + sink; }\n")
    d = compile_pair(tmp_path, src % 4, src % 5)
    assert names(d.changed) == ["f", "g"] and not d.refusals
    assert "table" in d.new_data and any("table" in n and "own copy" in n for n in d.notes)


def test_changed_global_const_is_rewritten_in_place(tmp_path):
    # Other objects may read a global const: only the same address with new contents reaches
    # them, so it is rewritten in place, just the bytes that differ.
    src = "const int limits[4] = {1, %d, 3, 4};\nint f(int i) { return limits[i & 3]; }\n"
    d = compile_pair(tmp_path, src % 2, src % 3)
    assert not d.refusals and not d.changed
    [w] = d.rewrites
    assert (w.name, w.size, w.ranges, w.ro_after_init) == ("limits", 16, [(4, 1)], False)


OPS = """
struct ops { int (*open)(int); int (*read)(int); long flags; };
static int op_open(int x) { return printk("open %%d", x); }
int op_read(int x) { return printk("read %%d", x); }
int op_read2(int x) { return printk("read2 %%d", x) + sink; }
const struct ops my_ops = { op_open, %s, 7 };
const struct ops *get_ops(void) { return &my_ops; }
"""


def test_const_ops_table_pointer_rewritten_in_place(tmp_path):
    d = compile_pair(tmp_path, OPS % "op_read", OPS % "op_read2")
    assert not d.refusals and not d.changed
    [w] = d.rewrites
    assert (w.name, w.ranges) == ("my_ops", [(8, 8)])  # the one pointer that differs


def test_ops_table_pointing_to_a_new_function(tmp_path):
    post = OPS.replace("int op_read2", "noinline int op_read3(int x) { return sink * x; }\n"
                                       "int op_read2") % "op_read3"
    d = compile_pair(tmp_path, OPS % "op_read", post)
    assert names(d.new) == ["op_read3"] and [w.name for w in d.rewrites] == ["my_ops"]


def test_ro_after_init_policy_rewritten_not_copied(tmp_path):
    # seg6's fix: a static const netlink policy (no pointers), which the family (__ro_after_init)
    # points to: a copy would not reach the family, so the policy is rewritten in place.
    src = """
    struct policy { unsigned char type, validation; unsigned short len; };
    static const struct policy seg6_policy[3] = { {1, 0, 4}, {11, %d, %d}, {1, 0, 4} };
    struct family { const char *name; const struct policy *policy; int id; };
    static struct family seg6_family __attribute__((section(".data..ro_after_init"))) =
        { "SEG6", seg6_policy, 0 };
    struct family *get_family(void) { return &seg6_family; }
    """
    d = compile_pair(tmp_path, src % (0, 16), src % (1, 0))
    assert not d.refusals and not d.changed and not d.new_data
    [w] = d.rewrites
    assert (w.name, w.ranges, w.ro_after_init) == ("seg6_policy", [(5, 2)], False)
    # the family itself, changed, is rewritten too, and known to hold words written at boot
    family = src.replace("seg6_policy, 0", "seg6_policy, %d")
    (tmp_path / "b").mkdir()
    d = compile_pair(tmp_path / "b", family % (0, 16, 0), family % (0, 16, 1))
    [w] = d.rewrites
    assert (w.name, w.ranges, w.ro_after_init) == ("seg6_family", [(16, 1)], True)


def test_what_is_not_rewritten_in_place(tmp_path):
    src = "const int limits[%d] = {1, 2};\nint f(int i) { return limits[i & 1]; }\n"
    d = compile_pair(tmp_path, src % 2, src % 3)
    assert any("changed data object limits" in r and "keeps the size" in r for r in d.refusals)
    src = "const int limits[2] = {1, %d};\nint f(int i) { return limits[i & 1]; }\n"
    objs = []
    for tag, n in (("mpre", 2), ("mpost", 3)):
        (tmp_path / tag).mkdir()
        objs.append(compile_one(tmp_path / tag, src % n))
    d = diff_objects(objs[0], objs[1], "t.o", module="mod")
    assert any("module mod may load again" in r for r in d.refusals) and not d.rewrites


def test_func_names_are_correlated_by_contents(tmp_path):
    # __func__.N are numbered in order: a renamed helper leaves a __func__.0 of another contents,
    # which is a new string, not changed data.
    pre = ("static noinline int helper(int x) { return printk(\"%s %d\", __func__, x); }\n"
           "int f(int x) { return helper(x) + printk(\"%s\", __func__); }\n")
    post = pre.replace("helper", "helper_renamed")
    d = compile_pair(tmp_path, pre, post)
    assert names(d.changed) == ["f"] and names(d.new) == ["helper_renamed"] and not d.refusals


# A dynamic debug descriptor as DEFINE_DYNAMIC_DEBUG_METADATA lays it out (struct _ddebug).
DYNDBG = """
struct _ddebug { const char *modname, *function, *filename, *format;
                 unsigned int lineno:18, class_id:6, flags:8; long key[2]; } __attribute__((aligned(8)));
void __dynamic_pr_debug(struct _ddebug *d, const char *fmt, ...);
#define pr_debug(fmt, ...) do { static struct _ddebug __attribute__((used, section("__dyndbg"))) \\
    __UNIQUE_ID_ddebug = { "t", __func__, "t.c", fmt, __LINE__, 63, 0 }; \\
    __dynamic_pr_debug(&__UNIQUE_ID_ddebug, fmt, ##__VA_ARGS__); } while (0)
"""


def test_dyndbg_line_shift_is_not_a_change(tmp_path):
    src = DYNDBG + "int f(int x) { pr_debug(\"f %d\\n\", x); return x; }\n"
    d = compile_pair(tmp_path, src, src.replace("int f(", "\n\nint f("))
    assert not d.changed and not d.refusals and not d.new_data


def test_changed_dyndbg_message_is_copied(tmp_path):
    src = DYNDBG + ("int f(int x) { pr_debug(\"%s %%d\\n\", x); return x; }\n"
                    "int g(int x) { pr_debug(\"g %%d\\n\", x); return x + 1; }\n")
    d = compile_pair(tmp_path, src % "f", src % "f now")
    assert names(d.changed) == ["f"] and not d.refusals


@pytest.mark.parametrize("section, flags, data, kind, name", [
    # The kernel's BUG/WARN asm does this for __FILE__: a string literal, not a kernel symbol.
    (".rodata.f.str1.1", "aMS", ".string \\\"t.c\\\"", "str", "t.c"),
    # A constant: a place in its section, which the new code copies.
    (".rodata.cst8", "aM", ".quad 42", "sec", ".rodata.cst8"),
])
def test_local_label_in_mergeable_section(tmp_path, section, flags, data, kind, name):
    # gas keeps .L labels of mergeable sections as symbols: they are anonymous places.
    src = (f"long f(void) {{ long v;\n"
           f"  asm(\".pushsection {section},\\\"{flags}\\\",@progbits,1\\n.LCx: {data}\\n"
           f".popsection\\n lea .LCx(%%rip), %0\" : \"=r\"(v)); return v; }}\n")
    obj = compile_one(tmp_path, src)
    targets = [obj.target(r) for r in obj.functions["f"].relocs]
    assert any(t.kind == kind and t.name == name for t in targets), targets


def test_rip_relative_reference_with_immediate(tmp_path):
    # `cmpb $0, flag(%rip)` has addend -5: still a reference to the static variable, not to
    # an anonymous piece of its section.
    src = "static char flag;\nvoid set(void) { flag = 1; }\nint f(void) { return flag == 7 ? sink : 0; }\n"
    obj = compile_one(tmp_path, src)
    relocs = [r for name in ("set", "f") for r in obj.functions[name].relocs]
    assert any(r.addend < -4 for r in relocs)  # the case this is about
    targets = [obj.target(r) for r in relocs]
    assert all(t.kind == "sym" for t in targets) and \
        {t.name for t in targets} == {"flag", "sink", "__fentry__"}, targets


def test_new_function_in_a_boot_table_is_refused(tmp_path):
    # As DECLARE_PCI_FIXUP_FINAL writes it: an anonymous entry the kernel walked at boot.
    pre = "int f(int x) { return x + sink; }\n"
    post = pre + ("static void quirk(void *dev) { sink = 1; }\n"
                  "asm(\".section .pci_fixup_final, \\\"a\\\"\\n .balign 16\\n .short 0x1022, 0x15b8\\n"
                  " .long 0, 0\\n .long quirk - .\\n .previous\\n\");\n"
                  "void *keep = quirk;\n")
    d = compile_pair(tmp_path, pre, post)
    assert any("new function quirk is entered in .pci_fixup_final" in r for r in d.refusals), d.refusals


def test_new_function_with_a_jump_table_is_not_a_boot_table_entry(tmp_path):
    pre = "int f(int x) { return x + sink; }\n"
    post = ("noinline int pick(int x) { switch (x) { case 0: return sink; case 1: return 5;\n"
            "  case 2: return sink * 9; case 3: return sink - 2; case 4: return 11; case 5: return sink << 3;\n"
            "  case 6: return sink ^ 7; default: return 0; } }\n"
            "int f(int x) { return pick(x) + sink; }\n")
    d = compile_pair(tmp_path, pre, post)
    obj = ObjectFile(tmp_path / "post" / "t.o")
    table = [s for s in obj.sections if s is not None and s.name.startswith(".rodata") and s.relocs]
    assert table  # the case this is about: an anonymous jump table pointing into pick
    assert names(d.changed) == ["f"] and names(d.new) == ["pick"] and not d.refusals, d.refusals


# Sites the kernel rewrites, as its macros lay them out (objtool writes .static_call_sites for
# calls to __SCT__ trampolines; here the asm does).
SITES = r"""
struct static_key { int enabled; } key_a;
static inline __attribute__((always_inline)) int key_on(struct static_key *k) {
    asm goto("1: .byte 0x0f,0x1f,0x44,0x00,0x00\n\t.pushsection __jump_table, \"aw\"\n\t"
             ".balign 8\n\t.long 1b - ., %l[yes] - .\n\t.quad %c0 - .\n\t.popsection"
             : : "i"(k) : : yes);
    return 0;
yes:
    return 1;
}
#define STATIC_CALL(name) asm volatile("1: call __SCT__" #name "\n\t.pushsection "  \
    ".static_call_sites, \"aw\"\n\t.long 1b - ., __SCK__" #name " - .\n\t.popsection"  \
    : : : "memory", "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
#define LOCK_INC(p) asm volatile(".pushsection .smp_locks, \"a\"\n\t.balign 4\n\t"  \
    ".long 671f - .\n\t.popsection\n671:\n\tlock incl %0" : "+m"(*(p)))
#define ALTERNATIVE_NOP() asm volatile("661: .byte 0x0f,0x1f,0x44,0x00,0x00\n662:\n\t"  \
    ".pushsection .altinstructions, \"a\"\n\t.long 661b - .\n\t.long 663f - .\n\t.word 42\n\t"  \
    ".byte 662b - 661b\n\t.byte 664f - 663f\n\t.popsection\n\t"  \
    ".pushsection .altinstr_replacement, \"ax\"\n663: .byte 0x90,0x90,0x90,0x90,0x90\n664:\n\t"  \
    ".popsection")
"""


@pytest.mark.parametrize("body, reason", [
    # synchronize_net: might_sleep()'s static call to might_resched right after fentry
    ("STATIC_CALL(might_resched); return sink * %d;",
     r"its static call site to might_resched at offset 0x5 \(5 bytes\) lies under the 5-byte jump "
     r"at offset 0x5, and the kernel rewrites that site while it runs"),
    # __consume_stateless_skb, device_unregister: a tracepoint's or pr_debug()'s static key (here
    # after a 2-byte mov: partly under the jump)
    ("if (key_on(&key_a)) return x + sink; return x - %d;",
     r"its jump label site on key_a at offset 0x[5-9] \(5 bytes\) lies under the 5-byte jump at "
     r"offset 0x5"),
    ("LOCK_INC(&sink); return x + %d;",
     r"its lock prefix site at offset 0x[5-9] \(1 byte\) lies under the 5-byte jump at offset 0x5"),
])
def test_site_the_kernel_rewrites_under_the_jump_is_refused(tmp_path, body, reason):
    src = "int f(int x) { " + body + " }\n"
    d = compile_pair(tmp_path, SITES + src % 3, SITES + src % 5)
    assert not d.changed
    assert [r for r in d.refusals
            if re.search("^t.o: cannot redirect changed function f: " + reason, r)], d.refusals


@pytest.mark.parametrize("body", [
    # Patched once at boot, before any update: the jump may cover it.
    "ALTERNATIVE_NOP(); return x * %d + sink;",
    # Further in: the jump leaves it alone.
    "int y = printk(\"x\"); y += sink * 7; if (key_on(&key_a)) return x + y; return x - %d;",
])
def test_site_the_kernel_leaves_alone_is_not_refused(tmp_path, body):
    src = "int f(int x) { " + body + " }\n"
    d = compile_pair(tmp_path, SITES + src % 3, SITES + src % 5)
    assert names(d.changed) == ["f"] and not d.refusals, d.refusals


def test_pre_record_masks_name_their_kind(tmp_path):
    from livesplice.create import pre_record
    obj = compile_one(tmp_path, SITES + "int f(int x) { if (key_on(&key_a)) return x + sink; "
                      "STATIC_CALL(might_resched); LOCK_INC(&sink); return x; }\n")
    masks = [m.to_json() for m in pre_record(obj, "t.o", obj.functions["f"]).masks]
    assert [0, 5, "fentry call"] in masks
    assert {m[2] for m in masks} == {"fentry call", "jump label", "static call", "lock prefix"}
    assert all(len(m) == 3 for m in masks)


def test_an_alias_is_one_function(tmp_path):
    # module_init(fn) on a function that is not __init gives it a second name, init_module, at
    # the same place: one function is replaced (and jumped to) once, under its own name.
    src = """
    static int uvesa_init(void) { return printk("x%d", sink) + %d; }
    int init_module(void) __attribute__((alias("uvesa_init")));
    """
    d = compile_pair(tmp_path, src.replace("%d;", "1;"), src.replace("%d;", "2;"))
    assert names(d.changed) == ["uvesa_init"]
    assert ObjectFile(tmp_path / "post" / "t.o").aliases == {"init_module": "uvesa_init"}


def hook_macros() -> str:
    """livesplice.h's hook macros as they are, with the kernel's own definitions they use."""
    header = (Path(__file__).parent.parent / "livesplice/data/include/livesplice.h").read_text()
    lines = header[header.index("typedef int"):header.index("/* The data attached")]
    return ("#define __used __attribute__((__used__))\n"
            "#define __section(s) __attribute__((__section__(s)))\n"
            + "\n".join(line for line in lines.splitlines()
                        if not line.lstrip().startswith(("void *", "void livesplice"))) + "\n")


def test_hooks_are_the_patchs_own_in_source_order(tmp_path):
    pre = "int f(int x) { return x + sink; }\n"
    post = hook_macros() + textwrap.dedent("""
        int f(int x) { return x + sink + 1; }
        static void second(void) { sink = 2; }
        static void first(void) { sink = 1; }
        static int check(void) { return sink == 7; }
        LIVESPLICE_POST_APPLY(second);
        LIVESPLICE_CHECK_APPLY(check);
        LIVESPLICE_POST_APPLY(first);
        LIVESPLICE_POST_APPLY(f);
    """)
    d = compile_pair(tmp_path, pre, post)
    assert not d.refusals, d.refusals
    assert d.hooks == [("post_apply", "second"), ("check_apply", "check"), ("post_apply", "first"),
                       ("post_apply", "f")]
    assert {"second", "first", "check"} <= {c.name for c in d.new}  # carried as new functions


def test_a_stacked_update_takes_only_its_own_hooks(tmp_path):
    older = hook_macros() + textwrap.dedent("""
        int f(int x) { return x + sink + 1; }
        static void older(void) { sink = 1; }
        LIVESPLICE_APPLY(older);
    """)
    newer = older.replace("sink + 1", "sink + 2") + textwrap.dedent("""
        static void newer(void) { sink = 2; }
        LIVESPLICE_REVERSE(newer);
    """)
    d = compile_pair(tmp_path, older, newer)
    assert not d.refusals and d.hooks == [("reverse", "newer")]


def test_a_hook_must_be_code_the_patch_brings(tmp_path):
    pre = "int f(int x) { return x + sink; }\nvoid g(void) { sink = 3; }\n"
    post = hook_macros() + pre.replace("x + sink", "x + sink + 1") + "LIVESPLICE_APPLY(g);\n"
    d = compile_pair(tmp_path, pre, post)
    assert d.refusals == ["t.o: apply hook g is not a function the patch adds or changes: a hook "
                          "must be the patch's own code"]


def kpatch_macros() -> str:
    """kpatch-macros.h's marking macros as they are, with the kernel's definitions they use."""
    header = (Path(__file__).parent.parent / "livesplice/data/include/kpatch-macros.h").read_text()
    start = header.index("#define KPATCH_IGNORE_FUNCTION")
    return ("#define __used __attribute__((__used__))\n"
            "#define __section(s) __attribute__((__section__(s)))\n"
            "#define __UNIQUE_ID(p) p##__COUNTER__\n"
            + header[start:header.index("#define KPATCH_PRINTK")])


def test_kpatch_ignore_and_force_marks(tmp_path):
    pre = ("int f(int x) { return x + sink; }\nint g(int x) { return x * sink; }\n"
           "__attribute__((section(\".text.unlikely.h\"))) int h(int x) { return x - sink; }\n")
    post = kpatch_macros() + pre.replace("x + sink", "x + sink + 1").replace(
        "x * sink", "x * sink * 2").replace("x - sink", "x - sink - 3") + (
        "KPATCH_IGNORE_FUNCTION(g);\nKPATCH_IGNORE_SECTION(\".text.unlikely.h\");\n"
        "KPATCH_FORCE_UNSAFE(f);\n")
    d = compile_pair(tmp_path, pre, post)
    assert names(d.changed) == ["f"] and not d.refusals, (d.changed, d.refusals)
    assert any("g: left out, as KPATCH_IGNORE_FUNCTION asks" in n for n in d.notes), d.notes
    assert any("h: left out, as KPATCH_IGNORE_SECTION asks" in n for n in d.notes), d.notes
    assert any("f: KPATCH_FORCE_UNSAFE is not honoured" in n for n in d.notes), d.notes


BTF_SRC = """
#define BTF_LIST(list, a, b) asm(".pushsection .BTF_ids,\\"a\\"\\n.local " #list "\\n" #list ":\\n" \\
    ".local " #a "\\n.type " #a ", STT_OBJECT\\n.size " #a ", 4\\n" #a ":\\n.zero 4\\n" \\
    ".local " #b "\\n.type " #b ", STT_OBJECT\\n.size " #b ", 4\\n" #b ":\\n.zero 4\\n.popsection\\n")
BTF_LIST(map_btf_ids, __BTF_ID__struct__bpf_htab__%d, __BTF_ID__struct__bpf_htab__%d);
extern unsigned int map_btf_ids[];
struct ops { int (*f)(int); unsigned int *btf_id; };
int f(int x) { return printk("%%d %%d", x, sink) + %d; }
const struct ops map_ops = { f, &map_btf_ids[1] };
"""


def test_btf_ids_are_correlated_by_place(tmp_path):
    # BTF_ID() names its 4-byte slot after __COUNTER__ and __LINE__: a patch that moves lines
    # renames it, which made every ops table that points to one look changed.
    d = compile_pair(tmp_path, BTF_SRC % (5382194, 5382195, 1), BTF_SRC % (5482212, 5482213, 2))
    assert names(d.changed) == ["f"] and not d.refusals, d.refusals
    assert d.names["__BTF_ID__struct__bpf_htab__5482213"] == "__BTF_ID__struct__bpf_htab__5382195"


def test_a_changed_pointer_is_a_range_of_its_own(tmp_path):
    # The core stores aligned words whole; a pointer merged into a range that starts before it
    # would still be, but a pointer never shares a range, and ranges are cut at 8-byte offsets.
    src = """
    int op_a(int x) { return printk("a %%d", x); }
    int op_b(int x) { return printk("b %%d", x); }
    struct desc { int x, y; int (*op)(int); };
    const struct desc my_desc = { 1, %d, %s };
    """
    d = compile_pair(tmp_path, src % (2, "op_a"), src % (3, "op_b"))
    [w] = d.rewrites
    assert w.ranges == [(4, 1), (8, 8)]


def test_a_pointer_to_init_code_is_refused(tmp_path):
    src = """
    int __init setup_a(void) { sink = 1; return 0; }
    int __init setup_b(void) { sink = 2; return 0; }
    const struct { int (*fn)(void); } boot_ops = { %s };
    """
    d = compile_pair(tmp_path, src % "setup_a", src % "setup_b")
    assert any("boot_ops" in r and "frees after boot" in r for r in d.refusals), d.refusals


def test_jump_goes_after_endbr_and_fentry():
    from livesplice.objdiff import jump_offset
    endbr = bytes.fromhex("f30f1efa")
    assert jump_offset(0, bytes(8)) == 5  # fentry at the entry (6.1)
    assert jump_offset(None, bytes(8)) == 0  # notrace
    assert jump_offset(4, endbr + bytes(4)) == 9  # IBT: ENDBR, then fentry (6.12)
    assert jump_offset(None, endbr + bytes(4)) == 4  # IBT, notrace: never over the ENDBR


RUNTIME_CONST = """
static inline unsigned long user_ptr_max(void) {
    unsigned long ret;
    asm("mov %%1,%%0\\n1:\\n.pushsection runtime_ptr_USER_PTR_MAX,\\"a\\"\\n\\t.long 1b - %%c2 - .\\n.popsection"
        : "=r" (ret) : "i" (0x0123456789abcdefUL), "i" (sizeof(long)));
    return ret;
}
int f(unsigned long p) { return p <= user_ptr_max() ? printk("ok") : %d; }
"""


def test_runtime_constants_are_masked_and_never_copied(tmp_path):
    # 6.11+: the kernel writes USER_PTR_MAX into its own code at boot; a module never gets it.
    from livesplice.elfmodel import runtime_patched_sites
    from livesplice.errors import Refused
    from livesplice.newcode import Extractor, NewCode, check_problems
    d = compile_pair(tmp_path, RUNTIME_CONST % 1, RUNTIME_CONST % 2)
    assert names(d.changed) == ["f"]
    post = ObjectFile(tmp_path / "post" / "t.o")
    [site] = [s for s in runtime_patched_sites(post, post.functions["f"])
              if s.kind == "runtime constant"]
    assert (site.length, site.what) == (8, "USER_PTR_MAX")
    assert post.functions["f"].data[site.offset:site.offset + 8] == \
        (0x0123456789ABCDEF).to_bytes(8, "little")
    code = NewCode()
    Extractor(code, "t.o", post, d.names, {"f"}).add_function(post.functions["f"])
    with pytest.raises(Refused) as caught:
        check_problems(code)
    assert "runtime constant USER_PTR_MAX" in caught.value.reasons[0]
