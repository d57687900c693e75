"""ARCHITECTURE.md's code map names every Rust source file of the
repository, so the map cannot drift from the code again.

A file counts as named when ARCHITECTURE.md holds its path from the
repository root (anywhere), or when its crate's code-map section (the
`### \\`crate\\`` heading, e.g. `### \\`proxy\\``) names it: a file under the
crate's `src/` by its file name (`router.rs`), or by `<dir>/<file>.rs`
when several files of the crate share that name (`router/tests.rs`); a
module directory's `mod.rs` by the directory (`routing/`); a file under
the crate's `tests/` by `tests/<file>.rs` (its test binary).

Run as a script (`python python-sdk/tests/test_code_map.py`) it lists
the files the map misses."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHITECTURE = os.path.join(ROOT, "ARCHITECTURE.md")
#: Directories that hold no source of the repository's own.
SKIP_DIRS = {"target", ".git", ".venv", ".venv-tf", "node_modules", ".serval"}


def rust_files(root=ROOT):
    """Every `.rs` file of the repository, as paths from `root` with `/`.
    Git's list when `root` is a checkout (files not yet added included,
    ignored ones not), else a walk that skips build and venv folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.rs"],
            cwd=root, capture_output=True, text=True, check=True, timeout=30,
        ).stdout
        # A file deleted but not yet staged is still in git's index.
        return sorted(p for p in out.splitlines() if os.path.exists(os.path.join(root, p)))
    except (OSError, subprocess.SubprocessError):
        found = []
        for top, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            rel = os.path.relpath(top, root).replace(os.sep, "/")
            found += [f if rel == "." else f"{rel}/{f}" for f in files if f.endswith(".rs")]
        return sorted(found)


def sections(text):
    """The code map's sections: {crate path: section text}, from the
    `### \\`crate\\`` headings under `## Code map`."""
    code_map = text.split("\n## Code map", 1)[1].split("\n## ", 1)[0]
    out = {}
    for part in code_map.split("\n### ")[1:]:
        heading, _, body = part.partition("\n")
        m = re.match(r"`([^`]+)`", heading)
        if m:
            out[m.group(1)] = body
    return out


def split_crate(path, crates):
    """(crate, path inside the crate) for the longest crate path that
    holds `path`, or (None, path)."""
    best = None
    for crate in crates:
        if path.startswith(crate + "/") and (best is None or len(crate) > len(best)):
            best = crate
    return (best, path[len(best) + 1:]) if best else (None, path)


def mentions(text, token):
    """`token` appears in `text` as a name of its own: not the tail of a
    longer name (`router.rs` is not in `my_router.rs`), though it may end
    a path (`routing/router.rs` names `router.rs`)."""
    return re.search(r"(?<![\w.-])" + re.escape(token), text) is not None


def missing(files, text):
    """The files of `files` that ARCHITECTURE.md's `text` does not name."""
    secs = sections(text)
    # Files per (crate, top folder, file name), to know which names are
    # ambiguous (`src/x.rs` and `tests/x.rs` are named apart anyway).
    by_name = {}
    for path in files:
        crate, inner = split_crate(path, secs)
        key = (crate, inner.split("/")[0], os.path.basename(inner))
        by_name.setdefault(key, []).append(inner)
    out = []
    for path in files:
        if mentions(text, path):
            continue
        crate, inner = split_crate(path, secs)
        if crate is None:
            out.append(path)
            continue
        section = secs[crate]
        parts = inner.split("/")
        name = parts[-1]
        if parts[0] == "tests" and len(parts) == 2:
            token = "tests/" + name
        elif name == "mod.rs" and len(parts) > 2:
            token = parts[-2] + "/"
        elif len(by_name[(crate, parts[0], name)]) > 1 and len(parts) > 2:
            token = parts[-2] + "/" + name
        else:
            token = name
        module = "`" + name[: -len(".rs")] + "`"
        if not (mentions(section, token) or (token == name and module in section)):
            out.append(path)
    return out


def test_every_rust_file_is_on_the_code_map():
    with open(ARCHITECTURE) as f:
        text = f.read()
    files = rust_files()
    assert len(files) > 100, files  # the listing itself works
    gaps = missing(files, text)
    assert not gaps, (
        "ARCHITECTURE.md's code map does not name these files "
        "(add a line each saying what they hold): " + ", ".join(gaps)
    )


def test_a_file_left_off_the_map_is_found():
    text = (
        "# x\n\n## Code map\n\n### `proxy`\n`router.rs` routes; `routing/` holds it.\n"
        "`router/tests.rs` tests it; `tests/http.rs` drives it.\n\n## Paths\n"
        "`router_metrics.rs` is named only outside the map.\n"
    )
    files = [
        "proxy/src/routing/router.rs",
        "proxy/src/routing/mod.rs",
        "proxy/src/routing/router/tests.rs",
        "proxy/tests/http.rs",
        "proxy/src/routing/router_metrics.rs",
        "proxy/src/route/tests.rs",
        "proxy/tests/router.rs",
        "node/src/agent.rs",
    ]
    assert missing(files, text) == [
        "proxy/src/routing/router_metrics.rs",
        "proxy/src/route/tests.rs",
        "proxy/tests/router.rs",
        "node/src/agent.rs",
    ]


if __name__ == "__main__":
    with open(ARCHITECTURE) as f:
        gaps = missing(rust_files(), f.read())
    print("\n".join(gaps))
    sys.exit(1 if gaps else 0)
