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
