"""What the new code carries and what it leaves to the running kernel, on objects compiled here."""

import subprocess

from test_objdiff import compile_pair

from livesplice.elfmodel import ObjectFile
from livesplice.newcode import Extractor, NewCode


def test_compiler_clones_are_carried_not_referenced(tmp_path):
    # A changed caller of an unchanged .constprop clone gets its own copy of the clone: the
    # kernel may have several clones of that name, and a clone is only ever called directly.
    body = """
    static noinline int work(int *p, int k) { int s = 0; for (int i = 0; i < k; i++) s += p[i] * 3; return s + sink; }
    int a(int *p) { return work(p, 16) + %d; }
    int b(int *p) { return work(p, 16) - 1; }
    """
    d = compile_pair(tmp_path, body % 1, body % 2)
    assert [c.name for c in d.changed] == ["a"]
    post = ObjectFile(tmp_path / "post" / "t.o")
    clones = [n for n in post.functions if n.startswith("work.")]
    assert clones, post.functions.keys()  # the case this is about
    code = NewCode()
    Extractor(code, "t.o", post, d.names, {"a"}).add_function(post.functions["a"])
    assert ("t.o", clones[0]) in code.functions
    assert not any(r.name.startswith("work") for r in code.refs.values())
    assert "sink" in {r.name for r in code.refs.values()}  # the clone's own references stay


def test_plain_constants_are_carried_not_referenced(tmp_path):
    # kallsyms has many __func__.N and such: a local constant without pointers is copied.
    src = ("static const int primes[4] = {2, 3, 5, 7};\n"
           "int f(int i) { return primes[i & 3] + %d; }\nint g(int i) { return primes[i & 1]; }\n")
    d = compile_pair(tmp_path, src % 1, src % 2)
    assert [c.name for c in d.changed] == ["f"] and not d.refusals
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    Extractor(code, "t.o", post, d.names, {"f"}).add_function(post.functions["f"])
    assert ("t.o", "primes") in code.data
    assert not any(r.name == "primes" for r in code.refs.values())


def test_plain_constants_the_data_points_to_are_referenced(tmp_path):
    # A table without pointers whose address the object's data holds (a driver's id table, as
    # xpad_driver.id_table = xpad_table) is the kernel's: new code compares with it or stores it
    # back (a hook's undo), and a copy of its own would be another object, gone with the update.
    src = ("static const int ids[4] = {2, 3, 5, 7};\n"
           "struct drv { const int *table; } drv = { .table = ids };\n"
           "int f(void) { return drv.table == ids ? %d : ids[1]; }\n"
           "int g(int i) { return ids[i & 1]; }\n")
    d = compile_pair(tmp_path, src % 1, src % 2)
    assert [c.name for c in d.changed] == ["f"] and not d.refusals
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    Extractor(code, "t.o", post, d.names, {"f"}).add_function(post.functions["f"])
    assert ("t.o", "ids") not in code.data
    assert any(r.name == "ids" for r in code.refs.values())


def test_section_name_is_unique_per_object_and_function():
    from livesplice.newcode import SECTION_NAME_MAX, section_name
    a = section_name("arch/x86/kernel/cpu/proc.o", "c_start")
    b = section_name("fs/proc/consoles.o", "c_start")
    assert a != b and a.startswith(".text.livesplice.") and a.endswith(".c_start")
    assert a == section_name("arch/x86/kernel/cpu/proc.o", "c_start")  # stable
    assert section_name("fs/proc/consoles.o", "c_next") != b
    long_a, long_b = (section_name("x.o", "f" * 300 + tail) for tail in ("1", "2"))
    assert long_a != long_b and max(len(long_a), len(long_b)) <= SECTION_NAME_MAX
    assert section_name("x.o", "f.cold").endswith(".f.cold")
    assert "[" not in section_name("x.o", "weird[1]")


def test_same_named_functions_of_two_objects_get_sections_of_their_own(tmp_path):
    from livesplice.newcode import section_name
    code = NewCode()
    for i, objname in enumerate(("a/one.o", "b/two.o")):
        src = "static noinline int helper(int x) { return x * %d + sink; }\nint f%d(int x) { return helper(x); }\n"
        (tmp_path / str(i)).mkdir()
        d = compile_pair(tmp_path / str(i), src % (3, i), src % (5, i))
        post = ObjectFile(tmp_path / str(i) / "post" / "t.o")
        assert [c.name for c in d.changed] == ["helper"]
        Extractor(code, objname, post, d.names, {"helper"}).add_function(post.functions["helper"])
    sections = [s.name for s in code.writer.sections if s.name.startswith(".text.livesplice.")]
    assert sorted(sections) == sorted([section_name("a/one.o", "helper"),
                                       section_name("b/two.o", "helper")])


def test_functions_whose_address_the_new_code_takes_are_callbacks(tmp_path):
    # `cb` becomes a callback (its address is stored), `helper` is only called: undo must not
    # free the first while something may still hold its address.
    from livesplice.newcode import callbacks
    src = """
    static noinline void cb(int *p) { p[1] = sink + %d; }
    static noinline int helper(int x) { return x * 7 + sink + %d; }
    void (*slot)(int *);
    int f(int x) { slot = cb; return helper(x) + %d; }
    """
    d = compile_pair(tmp_path, src % (1, 1, 1), src % (2, 2, 2))
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    changed = {c.name for c in d.changed}
    assert {"f", "cb", "helper"} <= changed
    Extractor(code, "t.o", post, d.names, changed).add_function(post.functions["f"])
    assert callbacks(code) == ["cb"]


def test_once_flags_get_a_copy_of_their_own(tmp_path):
    # DO_ONCE_LITE (printk_once, pr_warn_once...) keeps a static flag in .data.once; objects
    # have many of the same name (__already_done.N), so the new code keeps its own.
    src = """
    extern int printk(const char *fmt, ...);
    #define ONCE(x) ({ static _Bool __attribute__((section(".data.once"))) __already_done; \\
                      if (!__already_done) { __already_done = 1; printk(x); } })
    int f(int i) { if (i < 0) ONCE("neg\\n"); return i + %d; }
    int g(int i) { if (i > 9) ONCE("big\\n"); return i; }
    """
    d = compile_pair(tmp_path, src % 1, src % 2)
    assert [c.name for c in d.changed] == ["f"] and not d.refusals
    post = ObjectFile(tmp_path / "post" / "t.o")
    flags = [n for n, item in post.data_objects.items() if item.section.name == ".data.once"]
    assert len(flags) == 2, flags  # the case this is about: two flags of one name
    code = NewCode()
    Extractor(code, "t.o", post, d.names, {"f"}).add_function(post.functions["f"])
    assert not any(r.name.startswith("__already_done") for r in code.refs.values())
    assert [k for k in code.data if k[1].startswith("__already_done")]
    assert len([n for n in code.notes if "once-only flag" in n]) == 1  # one note per flag


def test_a_global_the_update_defines_resolves_inside_it(tmp_path):
    # A new global function in one object, called from a changed function of another: the call
    # goes to the update's own copy, not to a kernel symbol that does not exist.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = compile_pair(tmp_path / "a", "int other(void) { return 0; }\n",
                     "int other(void) { return 0; }\nint helper(int x) { return x * 7; }\n")
    b = compile_pair(tmp_path / "b", "int user(int x) { return x * sink + 3; }\n",
                     "int helper(int x);\nint user(int x) { return helper(x) * sink + 3; }\n")
    assert [c.name for c in a.new] == ["helper"] and [c.name for c in b.changed] == ["user"]
    code = NewCode()
    post_a = ObjectFile(tmp_path / "a" / "post" / "t.o")
    post_b = ObjectFile(tmp_path / "b" / "post" / "t.o")
    Extractor(code, "a.o", post_a, a.names, {"helper"}).add_function(post_a.functions["helper"])
    Extractor(code, "b.o", post_b, b.names, {"user"}).add_function(post_b.functions["user"])
    assert "helper" in {r.name for r in code.refs.values()}  # before: a kernel reference
    code.bind_own_globals()
    assert "helper" not in {r.name for r in code.refs.values()}
    code.writer.write(tmp_path / "m.o")
    out = subprocess.run(["readelf", "-W", "-s", "-r", str(tmp_path / "m.o")],
                         capture_output=True, text=True, check=True)
    assert not out.stderr
    undefined = {line.split()[-1] for line in out.stdout.splitlines() if " UND " in line
                 and line.split()[-1].startswith("__livesplice_sym_")}
    assert undefined == {r.placeholder for r in code.refs.values()}  # __fentry__, sink
    assert {r.name for r in code.refs.values()} == {"__fentry__", "sink"}


def test_the_update_module_never_defines_a_module_entry_point(tmp_path):
    # modpost makes any object symbol named init_module the module's init: the update module's
    # load must not run a copy of the target's.
    src = "int init_module(void) { return sink + %d; }\n"
    d = compile_pair(tmp_path, src % 1, src % 2)
    assert [c.name for c in d.changed] == ["init_module"]
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    sym = Extractor(code, "t.o", post, d.names, {"init_module"}).add_function(
        post.functions["init_module"])
    assert sym.name == "init_module.livesplice"


def test_shadow_calls_are_left_to_the_loader_not_the_kernel(tmp_path):
    # livesplice.h's functions are the core's exports: the update module keeps them undefined
    # by name (the loader links them, with their versions, and the update then depends on the
    # core), never as placeholders for kernel addresses.
    src = ("void *livesplice_shadow_get(void *obj, unsigned long id);\n"
           "int f(void *p) { int *x = livesplice_shadow_get(p, 7); return (x ? *x : 0) + %d; }\n")
    d = compile_pair(tmp_path, src % 1, src % 2)
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    Extractor(code, "t.o", post, d.names, {"f"}).add_function(post.functions["f"])
    assert "livesplice_shadow_get" in code.core_exports
    assert not any(r.name == "livesplice_shadow_get" for r in code.refs.values())
    code.writer.write(tmp_path / "new.o")
    undefined = {s.name for s in ObjectFile(tmp_path / "new.o").symbols if s.section is None}
    assert "livesplice_shadow_get" in undefined


def test_kernel_functions_whose_address_the_new_code_takes(tmp_path):
    # With IBT only a function that starts with ENDBR may be called indirectly: the new code
    # marks the kernel functions it takes the address of (stored, or written into a rewritten
    # ops table), not those it only calls, for apply to check their live first bytes.
    from livesplice.newcode import mark_address_taken
    src = """
    void kernel_cb(int *p);
    int kernel_helper(int x);
    struct ops { void (*cb)(int *); int (*get)(int); };
    const struct ops my_ops = { kernel_cb, %s };
    void (*slot)(int *);
    int f(int x) { slot = kernel_cb; return kernel_helper(x) + %d; }
    """
    d = compile_pair(tmp_path, src % ("0", 1), src % ("kernel_helper", 2))
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    ex = Extractor(code, "t.o", post, d.names, {c.name for c in d.changed})
    ex.add_function(post.functions["f"])
    mark_address_taken(code)
    assert {r.name: r.address_taken for r in code.refs.values()} == {
        "slot": True, "kernel_cb": True, "kernel_helper": False, "__fentry__": False}
    [w] = d.rewrites  # my_ops's .get now points to a kernel function: its address is taken
    ex.add_rewrite(post.data_objects["my_ops"], w.ranges)
    mark_address_taken(code)
    assert {r.name for r in code.refs.values() if r.address_taken} == {
        "slot", "kernel_cb", "kernel_helper"}


def test_a_table_rewritten_to_point_into_the_update_needs_force_to_undo(tmp_path):
    # The kernel may have copied a pointer out of a const table (a BPF JIT, a registered hook):
    # one that leads into the update (a new string here) makes undo ask for --force.
    from livesplice.newcode import callbacks
    src = 'struct desc { const char *name; int id; };\nconst struct desc my_desc = { "%s", 1 };\n'
    d = compile_pair(tmp_path, src % "old name", src % "new name")
    [w] = d.rewrites
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    Extractor(code, "t.o", post, d.names, set()).add_rewrite(post.data_objects["my_desc"], w.ranges)
    assert callbacks(code) == ["my_desc->__livesplice_str_0"]


def test_an_address_stored_after_a_displacement_of_0xe8_is_taken(tmp_path):
    # movq $kernel_cb, -0x18(%rbx): the byte before the absolute field is the displacement 0xe8,
    # which is no call opcode there.
    from livesplice.newcode import mark_address_taken
    src = """
    void kernel_cb(void);
    struct s { long a, b, c; void (*fn)(void); };
    int f(struct s *p) { ((void (**)(void))((char *)p + 0x18))[-6] = kernel_cb; return %d; }
    """
    d = compile_pair(tmp_path, src % 1, src % 2)
    post = ObjectFile(tmp_path / "post" / "t.o")
    code = NewCode()
    Extractor(code, "t.o", post, d.names, {"f"}).add_function(post.functions["f"])
    mark_address_taken(code)
    taken = {r.name: r.address_taken for r in code.refs.values()}
    assert taken["kernel_cb"] is True, taken
