"""Reading XLA's compiled HLO text: how many reductions the jitted update runs each step."""

from __future__ import annotations

import math
import re
from typing import Any

import jax


def update_hlo(tx: Any, updates: Any, params: Any = None, *, state: Any = None) -> str:
    """The compiled HLO text of ``jax.jit(tx.update)`` on ``updates``.

    ``state`` defaults to ``tx.init(params)`` (``tx.init(updates)`` without ``params``);
    ``params`` is passed to the update when given.
    """
    if state is None:
        state = tx.init(updates if params is None else params)
    args = (updates, state) if params is None else (updates, state, params)
    return jax.jit(tx.update).lower(*args).compile().as_text()


def _size(shape: str) -> int:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return math.prod(int(d) for d in m.group(1).split(",") if d) if m else -1


def reduction_count(text: str, sizes: set[int]) -> int:
    """``reduce`` instructions whose operand has one of ``sizes`` entries, on the path every
    step takes: computations reached from ENTRY through fusions and calls, not through the
    branches of a ``conditional`` (the non-finite handling) or the body of a ``while`` loop
    (inside the guards, the norms' loops hold only the overflow/underflow rescue trip)."""
    comps: dict[str, list[str]] = {}
    shapes: dict[str, dict[str, str]] = {}
    entry = name = None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) \((.*)\) -> .*\{$", line)
        if head:
            name = head.group(2)
            entry = name if head.group(1) else entry
            comps[name] = []
            shapes[name] = dict(re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", head.group(3)))
            continue
        if line == "}":
            name = None
        elif name is not None:
            inst = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])", line)
            if inst:
                shapes[name][inst.group(1)] = inst.group(2)
            comps[name].append(line)
    assert entry is not None, "no ENTRY computation in the HLO text"
    count, seen, stack = 0, set(), [entry]
    while stack:
        comp = stack.pop()
        if comp in seen:
            continue
        seen.add(comp)
        for line in comps[comp]:
            if " conditional(" in line or " while(" in line:
                continue
            stack += re.findall(r"calls=%([\w.\-]+)", line)
            m = re.search(r" reduce\(%([\w.\-]+)", line)
            if m and _size(shapes[comp].get(m.group(1), "")) in sizes:
                count += 1
    return count


def _computations(text: str) -> dict[str, list[str]]:
    """The instruction lines of each named computation of the compiled HLO."""
    bodies: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if head:
            name = head.group(1)
            bodies[name] = []
        elif line == "}":
            name = None
        elif name is not None:
            bodies[name].append(line)
    return bodies


def _computation_sizes(text: str) -> dict[str, int]:
    """The number of instructions in each named computation of the compiled HLO."""
    return {name: len(lines) for name, lines in _computations(text).items()}


def largest_fusion(text: str) -> int:
    """The most instructions in one fused computation (one kernel) of the compiled HLO."""
    called = set(re.findall(r" fusion\(.*calls=%([\w.\-]+)", text))
    return max([n for name, n in _computation_sizes(text).items() if name in called] + [0])


def _entry_instructions(text: str):
    """``(name, result shapes, opcode, operand names)`` for each instruction of the entry
    computation; a tuple result gives several shapes (layouts and comments left out)."""
    entry = text[text.index("\nENTRY") :]
    for line in entry.splitlines():
        inst = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?) (\w[\w\-]*)\(", line)
        if inst:
            shapes = re.findall(r"\w+\[[\d,]*\]", re.sub(r"/\*.*?\*/", "", inst.group(2)))
            operands = re.findall(r"%([\w.\-]+)", line[inst.end() :].split(")", 1)[0])
            yield inst.group(1), shapes, inst.group(3), operands


def entry_fusion_operands(text: str, shape: str) -> list[list[int]]:
    """For each fusion of the entry computation whose result has ``shape`` (e.g.
    ``"f32[8]"``), the element counts of its operands."""
    sizes: dict[str, int] = {}
    out = []
    for name, shapes, opcode, operands in _entry_instructions(text):
        sizes[name] = _size(shapes[0]) if len(shapes) == 1 else -1
        if opcode == "fusion" and shapes == [shape]:
            out.append([sizes.get(a, -1) for a in operands])
    return out


def _fusions_of_shape(text: str, shape: str) -> list[str]:
    """The fused computations called by the entry computation's fusions with result
    ``shape``, one per fusion."""
    entry = text[text.index("\nENTRY") :]
    return re.findall(rf"= {re.escape(shape)}\{{[\d,]*\}} fusion\(.*calls=%([\w.\-]+)", entry)


def distinct_fusions(text: str, shape: str) -> int:
    """How many different kernels (up to names) the entry computation's fusions with
    result ``shape`` are: what XLA compiles for them."""
    computations = _computations(text)
    return len({_anonymous(computations[name]) for name in _fusions_of_shape(text, shape)})


def entry_fusion_sizes(text: str, shape: str) -> list[int]:
    """For each fusion of the entry computation whose result has ``shape``, the number of
    instructions in its fused computation (what the kernel computes per entry)."""
    sizes = _computation_sizes(text)
    return [sizes[name] for name in _fusions_of_shape(text, shape)]


def while_body_sizes(text: str) -> list[int]:
    """The number of instructions in the body of each while loop of the compiled HLO."""
    bodies = set(re.findall(r" while\(.*body=%([\w.\-]+)", text))
    return [n for name, n in _computation_sizes(text).items() if name in bodies]


def scalar_kernels(text: str) -> list[str]:
    """The fusions of the entry computation that compute scalars (one, or a tuple of them)
    from scalars only: kernels of their own for what could be a few instructions."""
    scalar: dict[str, bool] = {}
    out = []
    for name, shapes, opcode, operands in _entry_instructions(text):
        scalar[name] = bool(shapes) and all(t.endswith("[]") for t in shapes)
        if opcode == "fusion" and scalar[name] and all(scalar.get(a, False) for a in operands):
            out.append(name)
    return out


def distinct_kernels(text: str, shape: str) -> int:
    """How many different fused computations the entry computation's fusions with result
    ``shape`` call, up to the names of instructions and computations: the kernels XLA has
    to compile for that shape, when it compiles identical ones once."""
    computations = _computations(text)
    return len({_anonymous(computations[name]) for name in set(_fusions_of_shape(text, shape))})


def _anonymous(lines: list[str]) -> str:
    """A computation's instructions without metadata or the numbered names of instructions
    and computations: equal for kernels that XLA compiles once."""
    body = re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))
    return re.sub(r"%?[\w\-]+\.\d+", "x", body)


def slice_kernels(text: str, distinct: bool = False) -> int:
    """The fusions, in any computation (branches and loop bodies included: XLA compiles
    them all), that only slice (and bitcast) their operand: a kernel to compile, about 8 ms
    each on CPU, for what its reader could take as is. With ``distinct``, how many different
    ones (up to names), which is what XLA compiles."""
    computations = _computations(text)
    inst = re.compile(r"= .*? (\w[\w\-]*)\(")
    found = []
    for name in re.findall(r" fusion\(.*calls=%([\w.\-]+)", text):
        ops = {m.group(1) for m in map(inst.search, computations[name]) if m}
        if "slice" in ops and ops <= {"parameter", "slice", "bitcast"}:
            found.append(_anonymous(computations[name]))
    return len(set(found)) if distinct else len(found)


def variadic_reductions(text: str) -> int:
    """The fusions, in any computation (branches and loop bodies included), that hold a
    reduction of two or more operands: XLA (CPU) emits each with its own loop rather than
    YNNPACK, and compiles it slowly (about 6 ms a kernel)."""
    computations = _computations(text)
    tuple_reduce = re.compile(r"= \(.*?\) reduce\(")
    return sum(
        any(tuple_reduce.search(line) for line in computations[name])
        for name in re.findall(r" fusion\(.*calls=%([\w.\-]+)", text)
    )


def scalar_work(text: str, shape: str) -> int:
    """The most scalar instructions (other than parameters and constants) in one fusion of
    the entry computation whose result has ``shape``: scalar work that every such kernel
    repeats (a decision chain XLA copied into each leaf's kernel), where it could read one
    precomputed scalar. Each instruction adds to the compile time of every leaf."""
    computations = _computations(text)
    scalar = re.compile(r"= \w+\[\] (?!parameter|constant)")
    return max(
        [
            sum(bool(scalar.search(line)) for line in computations[name])
            for name in _fusions_of_shape(text, shape)
        ]
        + [0]
    )
