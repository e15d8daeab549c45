"""Offline corpora for the demo: three domains built from what every Python installation already has.

- ``code``: the standard library's own ``.py`` sources, with docstrings removed (they are prose, not code).
- ``math``: generated problems with worked, step-by-step solutions.
- ``prose``: English documentation text that ships with Python: the language reference topics in
  ``pydoc_data.topics`` and the standard library's docstrings, keeping only paragraphs that read as prose.

Each domain is split into train and held-out *documents* (source files, problems, paragraphs) by a stable hash
of the document, so no text is shared between the two sets; `check_no_overlap` verifies it. Nothing is downloaded.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

DOMAINS = ("code", "math", "prose")

# Standard-library trees that are tests, vendored tools or data tables rather than ordinary code.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "encodings", "ensurepip",
              "pydoc_data", "turtledemo", "tkinter", "__pycache__", "config-3", "lib-dynload", "venv"}


@dataclass
class Corpus:
    """Documents of one domain, split into train and held-out."""

    domain: str
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)

    def chars(self) -> tuple[int, int]:
        return sum(map(len, self.train)), sum(map(len, self.heldout))


def _stable_fraction(text: str, salt: str) -> float:
    digest = hashlib.sha256((salt + "\0" + text).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split(domain: str, docs: list[str], heldout_fraction: float, seed: int) -> Corpus:
    corpus = Corpus(domain)
    seen = set()
    for doc in docs:
        if doc in seen:  # exact duplicates would otherwise land on both sides of the split
            continue
        seen.add(doc)
        target = corpus.heldout if _stable_fraction(doc, f"{domain}:{seed}") < heldout_fraction else corpus.train
        target.append(doc)
    return corpus


# ------------------------------------------------------------------------------------------------ code
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _definitions(tree):
    """Module, class and function nodes, visiting statements only (much faster than ast.walk)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFS):
            yield node
        for name in ("body", "orelse", "finalbody", "handlers"):
            for child in getattr(node, name, ()) or ():
                if isinstance(child, ast.stmt) or isinstance(child, ast.excepthandler):
                    stack.append(child)


def _strip_docstrings(source: str) -> str | None:
    """The source without module, class and function docstrings; None if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    drop: set[int] = set()
    for node in _definitions(tree):
        if node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            ):
                if len(node.body) == 1:  # keep the block valid: a body of only a docstring becomes "pass"
                    continue
                drop.update(range(first.lineno, first.end_lineno + 1))
    lines = [line for i, line in enumerate(source.splitlines(), 1) if i not in drop]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _code_chunks(text: str, max_chars: int) -> list[str]:
    """Cut a file into pieces of about max_chars at statement boundaries: top-level statements first, then
    methods (lines starting a def/class/decorator at any indentation), then plain lines for whatever is left."""
    blocks = re.split(r"\n(?=\S)|\n(?=[ \t]*(?:def |async def |class |@))", text)
    pieces = []
    for block in blocks:
        while len(block) > 2 * max_chars:
            cut = block.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(block[:cut])
            block = block[cut + 1 :]
        pieces.append(block)
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n{piece}" if current else piece
    if current.strip():
        chunks.append(current)
    return [c for c in chunks if len(c) > 200]


def stdlib_sources(seed: int):
    """Yield (relative path, source) of standard-library modules in a seeded order."""
    import os

    root = stdlib_dir()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place: never descend into site-packages, tests or vendored trees
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "test")))
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith(("test_", "_pydecimal", "_pyio")) and name != "__main__.py":
                paths.append(rel_dir / name)
    paths.sort()
    random.Random(seed).shuffle(paths)
    for rel in paths:
        try:
            yield str(rel), (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def code_documents(limit_chars: int, seed: int, chunk_chars: int = 1500, per_file_chars: int = 9000) -> list[list[str]]:
    """Per source file, its docstring-free chunks (one list per file, so a file never straddles the split).
    At most per_file_chars come from one file, so that many files (and styles) are represented."""
    files, total = [], 0
    for _, source in stdlib_sources(seed):
        stripped = _strip_docstrings(source)
        if not stripped:
            continue
        chunks, size = [], 0
        for chunk in _code_chunks(stripped, chunk_chars):
            if size >= per_file_chars:
                break
            chunks.append(chunk)
            size += len(chunk)
        if chunks:
            files.append(chunks)
            total += size
        if total >= limit_chars:
            break
    return files


# ------------------------------------------------------------------------------------------------ math
_NAMES = ("Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena")
_ITEMS = ("apples", "books", "pencils", "tickets", "marbles", "stamps", "cards", "coins")


def _signed(v: int) -> str:
    return f"+ {v}" if v >= 0 else f"- {-v}"


def _linear(r: random.Random) -> str:
    a, x = r.randint(2, 12), r.randint(-15, 15)
    b = r.randint(-30, 30)
    c = a * x + b
    step = f"Subtract {b} from both sides" if b >= 0 else f"Add {-b} to both sides"
    return (f"Problem: Solve for x: {a}x {_signed(b)} = {c}.\n"
            f"Solution: {step}: {a}x = {c - b}. Divide both sides by {a}: x = {x}.\n"
            f"Check: {a} * ({x}) {_signed(b)} = {c}. Answer: x = {x}.")


def _quadratic(r: random.Random) -> str:
    p, q = r.randint(-9, 9), r.randint(-9, 9)
    b, c = -(p + q), p * q
    disc = b * b - 4 * c
    root = int(math.isqrt(disc))
    lo, hi = sorted((p, q))
    return (f"Problem: Solve the quadratic equation x^2 {_signed(b)}x {_signed(c)} = 0.\n"
            f"Solution: Use the quadratic formula x = (-b ± sqrt(b^2 - 4ac)) / (2a) with a = 1, b = {b}, c = {c}. "
            f"The discriminant is b^2 - 4ac = {b * b} - {4 * c} = {disc}, and sqrt({disc}) = {root}. "
            f"So x = ({-b} - {root}) / 2 = {lo} or x = ({-b} + {root}) / 2 = {hi}.\n"
            f"Check: the roots sum to {lo + hi} = -b and multiply to {lo * hi} = c. Answer: x = {lo} or x = {hi}.")


def _arithmetic(r: random.Random) -> str:
    a, b, c = r.randint(11, 99), r.randint(11, 99), r.randint(2, 60)
    ab = a * b
    return (f"Problem: Compute {a} * {b} + {c}.\n"
            f"Solution: First multiply: {a} * {b} = {a} * {b // 10 * 10} + {a} * {b % 10} = {a * (b // 10 * 10)} "
            f"+ {a * (b % 10)} = {ab}. Then add: {ab} + {c} = {ab + c}.\nAnswer: {ab + c}.")


def _fractions(r: random.Random) -> str:
    a, b = r.randint(1, 9), r.randint(2, 12)
    c, d = r.randint(1, 9), r.randint(2, 12)
    lcm = b * d // math.gcd(b, d)
    num = a * (lcm // b) + c * (lcm // d)
    g = math.gcd(num, lcm)
    return (f"Problem: Add the fractions {a}/{b} + {c}/{d}.\n"
            f"Solution: The least common denominator of {b} and {d} is {lcm}. "
            f"Rewrite: {a}/{b} = {a * (lcm // b)}/{lcm} "
            f"and {c}/{d} = {c * (lcm // d)}/{lcm}. Add the numerators: {num}/{lcm}. "
            f"The greatest common divisor of {num} and {lcm} is {g}, so the sum is {num // g}/{lcm // g}.\n"
            f"Answer: {num // g}/{lcm // g}.")


def _percent(r: random.Random) -> str:
    p, n = r.choice((5, 10, 12, 15, 20, 25, 30, 40, 45, 60, 75)), r.randint(2, 60) * 20
    return (f"Problem: What is {p}% of {n}?\n"
            f"Solution: {p}% means {p}/100. Multiply: {n} * {p} / 100 = {n * p} / 100 = {n * p / 100:g}.\n"
            f"Answer: {n * p / 100:g}.")


def _word(r: random.Random) -> str:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    boxes, per, given = r.randint(3, 12), r.randint(4, 25), r.randint(1, 20)
    total = boxes * per
    return (f"Problem: {name} has {boxes} boxes with {per} {item} in each box and gives away {given} {item}. "
            f"How many {item} are left?\n"
            f"Solution: The boxes hold {boxes} * {per} = {total} {item}. After giving away {given}, "
            f"{total} - {given} = {total - given} {item} remain.\nAnswer: {total - given}.")


def _system(r: random.Random) -> str:
    x, y = r.randint(-9, 9), r.randint(-9, 9)
    a, b = r.randint(1, 5), r.randint(1, 5)
    s, d = x + y, a * x - b * y
    return (f"Problem: Solve the system x + y = {s} and {a}x - {b}y = {d}.\n"
            f"Solution: From the first equation, y = {s} - x. Substitute: {a}x - {b}({s} - x) = {d}, so "
            f"{a + b}x - {b * s} = {d} and {a + b}x = {d + b * s}. Therefore x = {x} and y = {s} - ({x}) = {y}.\n"
            f"Answer: x = {x}, y = {y}.")


def _derivative(r: random.Random) -> str:
    a, b, c, n = r.randint(1, 9), r.randint(1, 9), r.randint(-9, 9), r.randint(3, 6)
    return (f"Problem: Find the derivative of f(x) = {a}x^{n} + {b}x^2 {_signed(c)}x.\n"
            f"Solution: Use the power rule d/dx x^k = k x^(k-1) term by term. The derivative of {a}x^{n} is "
            f"{a * n}x^{n - 1}, the derivative of {b}x^2 is {2 * b}x, and the derivative of {c}x is {c}.\n"
            f"Answer: f'(x) = {a * n}x^{n - 1} + {2 * b}x {_signed(c)}.")


def _area(r: random.Random) -> str:
    w, h, rad = r.randint(2, 30), r.randint(2, 30), r.randint(1, 12)
    return (f"Problem: A rectangle is {w} cm wide and {h} cm tall, and a circle has radius {rad} cm. "
            f"Which has the larger area?\n"
            f"Solution: The rectangle's area is {w} * {h} = {w * h} cm^2. The circle's area is pi * {rad}^2 = "
            f"{rad * rad}pi ≈ {math.pi * rad * rad:.2f} cm^2. "
            f"So the {'rectangle' if w * h > math.pi * rad * rad else 'circle'} is larger.\n"
            f"Answer: the {'rectangle' if w * h > math.pi * rad * rad else 'circle'}.")


def _gcd(r: random.Random) -> str:
    g = r.randint(2, 15)
    a, b = g * r.randint(2, 20), g * r.randint(2, 20)
    steps, x, y = [], max(a, b), min(a, b)
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    return (f"Problem: Find the greatest common divisor and least common multiple of {a} and {b}.\n"
            f"Solution: Apply the Euclidean algorithm: {'; '.join(steps)}. So gcd({a}, {b}) = {x}. "
            f"Then lcm = {a} * {b} / {x} = {a * b // x}.\nAnswer: gcd = {x}, lcm = {a * b // x}.")


MATH_TEMPLATES = (_linear, _quadratic, _arithmetic, _fractions, _percent, _word, _system, _derivative, _area, _gcd)


def math_documents(count: int, seed: int) -> list[str]:
    r = random.Random(f"math:{seed}")
    return [r.choice(MATH_TEMPLATES)(r) for _ in range(count)]


# ----------------------------------------------------------------------------------------------- prose
_HEADING = re.compile(r"^[*=\-~^\"#]{3,}\s*$")


def _is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if not lines or lines[0][:1].isspace() or ">>>" in paragraph or "::=" in paragraph:
        return False
    if any(_HEADING.match(line) for line in lines):
        return False
    words = paragraph.split()
    if len(words) < 12:
        return False
    letters = sum(ch.isalpha() or ch.isspace() or ch in ".,;:'\"()-" for ch in paragraph)
    if letters / len(paragraph) < 0.93:
        return False
    wordy = sum(w.strip(".,;:()\"'").isalpha() for w in words)
    return wordy / len(words) > 0.75


def _paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        if _is_prose(para):
            out.append(" ".join(para.split()))
    return out


def prose_documents(limit_chars: int, seed: int) -> list[str]:
    """English paragraphs from the language reference topics and standard-library docstrings."""
    paras: list[str] = []
    try:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            paras.extend(_paragraphs(topics[key]))
    except ImportError:  # some distributions strip pydoc_data; the docstrings below still give prose
        pass
    total = sum(map(len, paras))
    for _, source in stdlib_sources(seed + 1):  # docstrings, file by file, only as many as needed
        if total >= limit_chars:
            break
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in _definitions(tree):
            doc = ast.get_docstring(node)
            if doc:
                found = _paragraphs(doc)
                paras.extend(found)
                total += sum(map(len, found))
    paras = list(dict.fromkeys(paras))
    random.Random(f"prose:{seed}").shuffle(paras)
    out, total = [], 0
    for p in paras:
        out.append(p)
        total += len(p)
        if total >= limit_chars:
            break
    return out


# ----------------------------------------------------------------------------------------------- build
def build_corpora(chars_per_domain: int = 400_000, heldout_fraction: float = 0.1, seed: int = 0) -> dict[str, Corpus]:
    """The three domains, each about chars_per_domain characters, split into train and held-out documents."""
    corpora = {}
    # code: split by whole files (a held-out file is never seen), the files ordered by a stable hash
    files = code_documents(chars_per_domain, seed)
    files.sort(key=lambda chunks: _stable_fraction(chunks[0], f"code:{seed}"))
    code, target = Corpus("code"), heldout_fraction * sum(len(c) for f in files for c in f)
    for chunks in files:
        side = code.heldout if sum(map(len, code.heldout)) < target else code.train
        side.extend(chunks)
    corpora["code"] = code
    n_math = max(50, chars_per_domain // 260)
    corpora["math"] = _split("math", math_documents(n_math, seed), heldout_fraction, seed)
    corpora["prose"] = _split("prose", prose_documents(chars_per_domain, seed), heldout_fraction, seed)
    for corpus in corpora.values():
        check_no_overlap(corpus)
        if not corpus.train or not corpus.heldout:
            raise RuntimeError(f"the {corpus.domain} corpus is empty on one side of the split; is the stdlib here?")
    return corpora


def check_no_overlap(corpus: Corpus) -> None:
    shared = set(corpus.train) & set(corpus.heldout)
    if shared:
        raise AssertionError(f"{corpus.domain}: {len(shared)} documents are in both train and held-out")
