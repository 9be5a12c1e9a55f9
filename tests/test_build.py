"""The build side's pieces that need no kernel build: patches, struct spans in headers, the mirror."""

import textwrap

from livesplice import debian
from livesplice.mirror import SourceMirror
from livesplice.patches import changed_lines, file_patch, patch_files
from livesplice.structlayout import structs_at_lines

HEADER = textwrap.dedent("""\
    /* struct not_this { in a comment */
    #define BRACES { 1, 2 }
    struct outer {
    	int a;
    	union {
    		long b;
    		char *c;
    	};
    	struct inner {
    		int d;
    	} e;
    	const char *s; /* "}" */
    };

    static inline int f(struct outer *o)
    {
    	return o->a + '}';
    }
    union u { int x; };
    """)


def test_changed_lines_of_removals_and_insertions():
    new = HEADER.replace("\tint a;\n", "\tint a2;\n").replace("\t\tint d;\n", "\t\tint d;\n\t\tint d2;\n")
    patch = file_patch("include/x.h", HEADER, new)
    assert patch_files(patch) == ["include/x.h"]
    # line 4 (int a) replaced: removed, and its new text inserted after it; two lines inserted
    # between lines 10 and 11
    assert changed_lines(patch) == {"include/x.h": {4, 4.5, 10.5}}
    # a file the patch adds or deletes
    added = file_patch("include/new.h", "", "int x;\n").replace("--- a/include/new.h", "--- /dev/null")
    assert changed_lines(added) == {"include/new.h": {0.5}}


def test_structs_at_lines():
    assert structs_at_lines(HEADER, {4}) == {"struct outer"}
    assert structs_at_lines(HEADER, {6}) == {"struct outer"}  # in an anonymous union inside it
    assert structs_at_lines(HEADER, {10}) == {"struct outer", "struct inner"}
    assert structs_at_lines(HEADER, {3.5}) == {"struct outer"}  # right after the opening line
    assert structs_at_lines(HEADER, {13.5}) == set()  # after its closing line
    assert structs_at_lines(HEADER, {2.5, 1}) == set()  # the comment and the macro's braces
    assert structs_at_lines(HEADER, {17}) == set()  # a function
    assert structs_at_lines(HEADER, {19}) == {"union u"}


def test_trees_of_one_kernel_version_share_a_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVESPLICE_CACHE", str(tmp_path / "cache"))
    for name, sublevel in (("a", 187), ("b", 187), ("c", 190)):
        (tmp_path / name / "kernel").mkdir(parents=True)
        (tmp_path / name / "Makefile").write_text(
            f"VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = {sublevel}\nEXTRAVERSION =\n")
    a, b, c = (SourceMirror(tmp_path / n) for n in "abc")
    assert a.root == b.root == debian.cache_root() / "trees" / "linux-6.1.187"
    assert c.root != a.root
