"""What the new code carries and what it leaves to the running kernel, on objects compiled here."""

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
    from livesplice.newcode import entry_sections, section_name
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
    # apply reads the names from the manifest
    assert entry_sections({"new_section": "s", "new_part_sections": ["p"]}) == ("s", ["p"])


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
