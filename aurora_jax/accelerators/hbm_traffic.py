"""Bytes a compiled XLA:TPU program moves to and from HBM, counted per instruction.

XLA's `cost_analysis()` gives one number per program, "bytes accessed", that adds every
instruction's operand and result bytes wherever they live. On TPU that over-counts HBM
traffic: the compiler copies weights and caches into on-chip memory ahead of use (memory
space S(1), by `copy-start` and `slice-start`), and the copy's bytes are counted again when
the instruction that uses them reads them there. This module reads the optimized HLO
(`Compiled.as_text()`), where every array's layout names its memory space, and counts only
what crosses HBM:

- an operand or result in memory space 0 (no `S(n)` in its layout) counts its bytes; one in
  on-chip memory (S(1) and up) counts nothing;
- a prefetch (`copy-start`, `slice-start`) reads its HBM source once (a slice: the slice's
  bytes) and writes nothing to HBM; the matching `-done` is free, and so are parameter,
  constant, bitcast, tuple and get-tuple-element;
- a slice, dynamic slice or gather reads only what it takes; a dynamic-update-slice or
  scatter is in place and moves only its update;
- a fusion reads of an HBM operand only what its fused computation takes of it (the slices,
  where every use is a slice) and writes only the update where its result is an in-place
  update of an operand;
- a conditional counts its dearest branch, and a while loop its body times its trip count
  (once, and marked unknown, where the compiler did not record the count);
- a custom call (a Mosaic kernel) reads each of its HBM operands whole and writes each HBM
  result whole. The kernel's own DMAs are not visible in the HLO; whole is what a decode
  kernel reads when the context fills the cache, and an upper bound otherwise.

Bytes are logical (elements times element size), as in XLA's own count: tile padding is
not added. This is a reading of the schedule the compiler chose, not a measurement.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "token": 0, "opaque": 0,
}


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: its bytes and memory space (0: HBM)."""

    dtype: str
    dims: tuple[int, ...]
    space: int

    @property
    def bytes(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return int(n * DTYPE_BYTES[self.dtype])

    @property
    def in_hbm(self) -> bool:
        return self.space == 0


Shape = list  # of Array or of Shape (a tuple's elements)


def _leaves(shape) -> list[Array]:
    if isinstance(shape, Array):
        return [shape]
    return [a for s in shape for a in _leaves(s)]


def _hbm(shape) -> int:
    return sum(a.bytes for a in _leaves(shape) if a.in_hbm)


_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_SPACE = re.compile(r"S\((\d+)\)")


def parse_shape(text: str, i: int = 0) -> tuple[Array | list, int]:
    """The shape starting at text[i] (an array or a tuple of shapes) and where it ends."""
    while text[i] == " ":
        i += 1
    if text[i] == "(":
        elements: list = []
        i += 1
        while True:
            while text[i] in " ,":
                i += 1
            if text[i] == ")":
                return elements, i + 1
            shape, i = parse_shape(text, i)
            elements.append(shape)
    m = _ARRAY.match(text, i)
    if m is None:
        raise ValueError(f"no HLO shape at {text[i:i + 40]!r}")
    dims = tuple(int(d.replace("<=", "")) for d in m.group(2).split(",") if d.strip())
    i, space = m.end(), 0
    if i < len(text) and text[i] == "{":  # the layout, where a memory space is named
        end = text.index("}", i)
        layout = text[i:end]
        if ":" in layout:
            s = _SPACE.search(layout.split(":", 1)[1])
            space = int(s.group(1)) if s else 0
        i = end + 1
    return Array(m.group(1), dims, space), i


@dataclasses.dataclass
class Instruction:
    name: str
    shape: Array | list
    opcode: str
    operands: list[str]
    args: str
    """What stands between the opcode's parentheses (a parameter's index, a constant's value)."""
    attrs: str


_NAME = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")


def parse_instruction(line: str) -> Instruction | None:
    line = _COMMENT.sub("", line)
    m = _NAME.match(line)
    if m is None:
        return None
    shape, i = parse_shape(line, m.end())
    op = _OPCODE.match(line, i)
    if op is None:
        return None
    depth, j = 1, op.end()
    while depth:  # the operand list ends at the matching parenthesis
        depth += {"(": 1, ")": -1}.get(line[j], 0)
        j += 1
    operands = []
    if op.group(1) != "constant":
        for part in re.split(r",(?![^{(]*[})])", line[op.end():j - 1]):
            names = re.findall(r"%([\w.\-]+)", part)
            if names:
                operands.append(names[-1])
    return Instruction(m.group(1), shape, op.group(1), operands, line[op.end():j - 1], line[j:])


@dataclasses.dataclass
class Computation:
    name: str
    instructions: dict[str, Instruction]
    root: str
    params: dict[int, str]
    """The name of each parameter, by index."""

    def users(self, name: str) -> list[Instruction]:
        return [x for x in self.instructions.values() if name in x.operands]


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


def parse_module(hlo_text: str) -> tuple[dict[str, Computation], str]:
    """Every computation of an HLO module's text, and the entry computation's name."""
    comps: dict[str, Computation] = {}
    entry: str | None = None
    current: str | None = None
    root: str | None = None
    insts: dict[str, Instruction] = {}
    params: dict[str, dict[int, str]] = {}
    for line in hlo_text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current, insts, root = h.group(2), {}, None
                params[current] = {}
                if h.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            comps[current] = Computation(current, insts, root or "", params[current])
            current = None
            continue
        inst = parse_instruction(line)
        if inst is None:
            continue
        insts[inst.name] = inst
        if line.lstrip().startswith("ROOT"):
            root = inst.name
        if inst.opcode == "parameter":
            params[current][int(inst.args)] = inst.name
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all",
        "partition-id", "replica-id", "opt-barrier", "add-dependency", "copy-done",
        "slice-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
        "async-done", "send-done", "recv-done"}
"""Instructions that move nothing themselves (a `-done` completes what its start counted)."""

SLICES = {"slice", "dynamic-slice", "gather"}
UPDATES = {"dynamic-update-slice": 1, "scatter": 2}
"""In-place updates, and the operand index of the update they write."""


@dataclasses.dataclass
class Traffic:
    """HBM bytes of a program: read, written, by opcode, and loops of unknown trip count."""

    read: int = 0
    written: int = 0
    by_opcode: Counter = dataclasses.field(default_factory=Counter)
    unknown_trip_counts: int = 0

    @property
    def total(self) -> int:
        return self.read + self.written

    def add(self, opcode: str, read: int, written: int, times: int = 1) -> None:
        self.read += read * times
        self.written += written * times
        if read + written:
            self.by_opcode[opcode] += (read + written) * times


class _Counter:
    def __init__(self, comps: dict[str, Computation]):
        self.comps = comps

    def shape_of(self, comp: Computation, name: str):
        return comp.instructions[name].shape

    def computation(self, name: str, traffic: Traffic, times: int = 1) -> None:
        comp = self.comps[name]
        for inst in comp.instructions.values():
            self.instruction(comp, inst, traffic, times)

    def instruction(self, comp: Computation, inst: Instruction, traffic: Traffic,
                    times: int) -> None:
        op = inst.opcode
        if op in FREE:
            return
        operands = [self.shape_of(comp, o) for o in inst.operands]
        if op in ("copy-start", "slice-start"):
            # copy-start: (destination, source, context); slice-start: ((source), destination,
            # sync flag)
            assert isinstance(inst.shape, list), inst
            dest = inst.shape[0 if op == "copy-start" else 1]
            read = sum(a.bytes for a in _leaves(dest)) if _hbm(operands[0]) else 0
            traffic.add(op, read, _hbm(dest), times)
        elif op in SLICES:
            taken = _leaves(inst.shape)[0].bytes if _hbm(operands[0]) else 0
            traffic.add(op, taken + sum(_hbm(s) for s in operands[1:]), _hbm(inst.shape),
                        times)
        elif op in UPDATES:
            k = UPDATES[op]
            update = _leaves(operands[k])[0].bytes
            rest = sum(_hbm(s) for i, s in enumerate(operands) if i not in (0, k))
            traffic.add(op, _hbm(operands[k]) + rest,
                        update if _hbm(inst.shape) else 0, times)
        elif op == "fusion":
            self.fusion(comp, inst, operands, traffic, times)
        elif op == "conditional":
            if "branch_computations=" in inst.attrs:  # an indexed switch
                branches = re.findall(r"%([\w.\-]+)", _attr(inst.attrs, "branch_computations"))
            else:  # a predicate's two branches
                branches = [_attr(inst.attrs, "true_computation"),
                            _attr(inst.attrs, "false_computation")]
            costs = []
            for b in branches:
                t = Traffic()
                self.computation(b.lstrip("%"), t)
                costs.append(t)
            dearest = max(costs, key=lambda t: t.total)
            traffic.add("conditional", dearest.read, dearest.written, times)
            traffic.unknown_trip_counts += dearest.unknown_trip_counts
        elif op == "while":
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
            if n is None:
                traffic.unknown_trip_counts += 1
            for key in ("body", "condition"):
                self.computation(_attr(inst.attrs, key).lstrip("%"), traffic,
                                 times * (int(n.group(1)) if n else 1))
        elif op == "call":
            self.computation(_attr(inst.attrs, "to_apply").lstrip("%"), traffic, times)
        else:  # elementwise, reduce, dot, collectives, custom calls: operands and results
            traffic.add(op, sum(_hbm(s) for s in operands), _hbm(inst.shape), times)

    def fusion(self, comp: Computation, inst: Instruction, operands: list, traffic: Traffic,
               times: int) -> None:
        fused = self.comps[_attr(inst.attrs, "calls").lstrip("%")]
        read = 0
        for i, shape in enumerate(operands):
            if _hbm(shape):
                read += _taken(fused, fused.params[i], _hbm(shape))
        root = fused.instructions[fused.root]
        if root.opcode == "tuple":
            outputs = [fused.instructions[o] for o in root.operands]
            results = inst.shape if isinstance(inst.shape, list) else [inst.shape]
        else:  # one array, or a multi-output op such as a variadic reduce
            outputs, results = [root], [inst.shape]
        written = 0
        for out, shape in zip(outputs, results, strict=True):
            if not _hbm(shape):
                continue
            update = _in_place_update(fused, out)
            written += _hbm(shape) if update is None else update
        traffic.add("fusion", read, written, times)


def _attr(attrs: str, key: str) -> str:
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", attrs)
    if m is None:
        raise ValueError(f"no {key}= in {attrs[:80]!r}")
    return m.group(1)


def _taken(fused: Computation, name: str, whole: int) -> int:
    """Bytes a fused computation reads of `name`: the slices it takes where every use (through
    bitcasts) is a slice or the target of an in-place update, else all of it."""
    taken = 0
    for user in fused.users(name):
        if user.opcode == "bitcast":
            taken += _taken(fused, user.name, whole)
        elif user.opcode in SLICES and user.operands[0] == name:
            taken += _leaves(user.shape)[0].bytes
        elif user.opcode in UPDATES and user.operands[0] == name:
            continue  # written in place; the update is counted as the fusion's output
        else:
            return whole
        if taken >= whole:
            return whole
    return taken


def _in_place_update(fused: Computation, out: Instruction) -> int | None:
    """The update's bytes where a fusion output is an in-place update of a parameter."""
    while out.opcode == "bitcast":
        out = fused.instructions[out.operands[0]]
    if out.opcode not in UPDATES:
        return None
    target = fused.instructions[out.operands[0]]
    while target.opcode == "bitcast":
        target = fused.instructions[target.operands[0]]
    if target.opcode != "parameter":
        return None
    return _leaves(fused.instructions[out.operands[UPDATES[out.opcode]]].shape)[0].bytes


def hbm_traffic(hlo_text: str) -> Traffic:
    """The HBM bytes of an optimized HLO module (see the module docstring for the rules)."""
    comps, entry = parse_module(hlo_text)
    traffic = Traffic()
    _Counter(comps).computation(entry, traffic)
    return traffic
