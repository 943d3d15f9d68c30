"""A built-in synthetic street world: a domain-shift benchmark that needs no download.

``render_scene(seed, size, style)`` draws a street seen from a car: a perspective road
with lane markings and crosswalks, sidewalks with curbs, grass strips, building facades
with windows, walls, fences, hedges, a far skyline, sky, and objects (cars, buses,
pedestrians, poles with traffic signs, traffic lights and street lamps, trees). The layout
depends on ``seed`` only; the ``style`` changes appearance only, so every style of a seed
has exactly the same label map.

Styles:
  * ``"game"`` (``SOURCE_STYLE``): flat, saturated, noise-free colours, like a video game.
  * ``TARGET_STYLES``: ``"realistic"`` (other palettes, textures, sky with clouds, sensor
    noise, slight blur), and on top of it ``"fog"`` (depth-dependent blend to grey),
    ``"night"`` (dark, gamma, lit windows, lamps and car lights), ``"rain"`` (dim,
    desaturated, wet road, streaks, blur) and ``"snow"`` (snow-covered ground, flakes,
    low contrast).
A model that keys on colour fails on the targets; one that uses shape transfers.

Labels are Cityscapes trainIds (``SYNTHETIC_CLASSES``), so everything else in rein works
unchanged. Rendering is vectorised numpy (about 10 ms for 128x128 on one core).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .datasets import SegDataset
from .labels import CLASSES

__all__ = [
    "SOURCE_STYLE",
    "STYLES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_CLASS_NAMES",
    "TARGET_STYLES",
    "SyntheticDataset",
    "render_scene",
]

SOURCE_STYLE = "game"
TARGET_STYLES: tuple[str, ...] = ("realistic", "fog", "night", "rain", "snow")
STYLES: tuple[str, ...] = (SOURCE_STYLE, *TARGET_STYLES)

# trainIds used by the synthetic world (rider, truck, train, motorcycle, bicycle never occur).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 0, 1, 2, 3, 4, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, CAR, BUS = 8, 9, 10, 11, 13, 15
SYNTHETIC_CLASSES: tuple[int, ...] = (
    ROAD,
    SIDEWALK,
    BUILDING,
    WALL,
    FENCE,
    POLE,
    LIGHT,
    SIGN,
    VEGETATION,
    TERRAIN,
    SKY,
    PERSON,
    CAR,
    BUS,
)
SYNTHETIC_CLASS_NAMES: tuple[str, ...] = tuple(CLASSES[c] for c in SYNTHETIC_CLASSES)

# Material parts: what a pixel is within its class (appearance only, never the label).
(
    P_BASE,
    P_MARK,
    P_CURB,
    P_WINDOW,
    P_GLASS,
    P_TIRE,
    P_TAIL,
    P_HEAD,
    P_TRUNK,
    P_SKIN,
    P_LEGS,
    P_SIGN_FACE,
    P_SIGN_RIM,
    P_TL_RED,
    P_TL_YELLOW,
    P_TL_GREEN,
    P_SLAT,
    P_LAMP,
    P_HAIR,
    P_SHOP,
    P_PLATE,
    P_CORNICE,
) = range(22)
N_PARTS = 24

# Surface orientation, for simple directional shading.
O_GROUND, O_LEFT_FACADE, O_RIGHT_FACADE, O_FRONT, O_SKY = range(5)

_FAR = 1.0e4  # depth of the sky, metres


# =========================================================================== geometry


@dataclass
class _Scene:
    """Rasterised scene: per-pixel label, material, instance, surface and world position."""

    h: int
    w: int
    f: float  # focal length, px
    vx: float  # vanishing point column, px
    yh: float  # horizon row, px
    cam_h: float  # camera height, m
    label: np.ndarray = field(init=False)
    part: np.ndarray = field(init=False)
    inst: np.ndarray = field(init=False)
    orient: np.ndarray = field(init=False)
    depth: np.ndarray = field(init=False)
    wy: np.ndarray = field(init=False)  # world height of the surface point, m
    cell: np.ndarray = field(init=False)  # window cell id (for lit windows at night)
    n_inst: int = 1
    lights: list[tuple[float, float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        shape = (self.h, self.w)
        self.label = np.full(shape, SKY, np.uint8)
        self.part = np.zeros(shape, np.uint8)
        self.inst = np.zeros(shape, np.int32)
        self.orient = np.full(shape, O_SKY, np.uint8)
        self.depth = np.full(shape, _FAR, np.float32)
        self.wy = np.zeros(shape, np.float32)
        self.cell = np.zeros(shape, np.int32)

    def new_inst(self) -> int:
        self.n_inst += 1
        return self.n_inst - 1

    # -- projection helpers
    def u_of(self, x: float, z: float) -> float:
        return self.vx + self.f * x / z

    def v_of(self, y: float, z: float) -> float:
        return self.yh + self.f * (self.cam_h - y) / z

    def frontal(
        self, z: float, x0: float, x1: float, y0: float, y1: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """Pixels of the world rectangle [x0, x1] x [y0, y1] on the plane at depth z:
        (bbox slices, world X grid, world Y grid), or None when not visible."""
        if z <= 0.5:
            return None
        c0 = max(int(math.floor(self.u_of(x0, z))), 0)
        c1 = min(int(math.ceil(self.u_of(x1, z))), self.w)
        r0 = max(int(math.floor(self.v_of(y1, z))), 0)
        r1 = min(int(math.ceil(self.v_of(y0, z))), self.h)
        if c0 >= c1 or r0 >= r1:
            return None
        xs = (np.arange(c0, c1) + 0.5 - self.vx) * (z / self.f)
        ys = self.cam_h - (np.arange(r0, r1) + 0.5 - self.yh) * (z / self.f)
        return (slice(r0, r1), slice(c0, c1)), xs[None, :], ys[:, None]

    def side(
        self, xs: float, z0: float, z1: float, y0: float, y1: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Pixels of the vertical plane X = xs between depths z0..z1 and heights y0..y1:
        (bbox slices, depth grid, world Y grid, inside mask), or None."""
        if abs(xs) < 0.05 or z1 <= 0.5:
            return None
        z0 = max(z0, 0.5)
        us = [self.u_of(xs, z0), self.u_of(xs, z1)]
        vs = [self.v_of(y, z) for y in (y0, y1) for z in (z0, z1)]
        c0 = max(int(math.floor(min(us))), 0)
        c1 = min(int(math.ceil(max(us))), self.w)
        r0 = max(int(math.floor(min(vs))), 0)
        r1 = min(int(math.ceil(max(vs))), self.h)
        if c0 >= c1 or r0 >= r1:
            return None
        du = np.arange(c0, c1) + 0.5 - self.vx
        with np.errstate(divide="ignore"):
            zz = np.where(du * xs > 0, self.f * xs / du, np.inf)[None, :]
        dv = (np.arange(r0, r1) + 0.5 - self.yh)[:, None]
        yy = self.cam_h - dv * zz / self.f
        inside = (zz >= z0) & (zz <= z1) & (yy >= y0) & (yy <= y1)
        return (slice(r0, r1), slice(c0, c1)), np.broadcast_to(zz, yy.shape), yy, inside

    def paint(
        self,
        sl: tuple[slice, slice],
        mask: np.ndarray,
        cls: int,
        inst: int,
        depth: float | np.ndarray,
        wy: np.ndarray,
        part: int | np.ndarray = P_BASE,
        orient: int = O_FRONT,
    ) -> None:
        """Overwrite the masked pixels of a bbox (painter's algorithm: far objects first)."""
        shape = (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        rr, cc = np.nonzero(np.broadcast_to(mask, shape))
        if rr.size == 0:
            return
        sub = (rr, cc)
        full = (rr + sl[0].start, cc + sl[1].start)
        self.label[full] = cls
        self.inst[full] = inst
        self.orient[full] = orient
        self.cell[full] = 0
        self.part[full] = (
            np.broadcast_to(part, shape)[sub] if isinstance(part, np.ndarray) else part
        )
        self.depth[full] = (
            np.broadcast_to(depth, shape)[sub] if isinstance(depth, np.ndarray) else depth
        )
        self.wy[full] = np.broadcast_to(wy, shape)[sub]


@dataclass
class _Segment:
    """A stretch of one street side: what stands on the facade line, and behind it."""

    z0: float
    z1: float
    kind: str  # building | vegetation | wall | fence | gap
    height: float
    inst: int
    back_kind: str  # none | building | vegetation
    back_offset: float
    back_height: float
    back_inst: int
    floor_h: float = 3.2
    win_pitch: float = 2.4
    win_w: float = 0.5
    win_h: float = 0.5
    shop: bool = False
    phase: float = 0.0


_BACK_CUM = np.cumsum((0.45, 0.4, 0.15))
_POLE_CUM = np.cumsum((0.4, 0.25, 0.25, 0.1))


def _pick(rng: np.random.Generator, cum: np.ndarray) -> int:
    """Index drawn with probabilities given as a cumulative sum (cheaper than rng.choice)."""
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)


def _side_segments(rng: np.random.Generator, scene: _Scene, z_end: float) -> list[_Segment]:
    segs: list[_Segment] = []
    z = 0.5
    kinds = ("building", "vegetation", "wall", "fence", "gap")
    cum = np.cumsum((0.58, 0.14, 0.1, 0.1, 0.08))
    while z < z_end:
        kind = kinds[_pick(rng, cum)]
        length = float(rng.uniform(8, 28) if kind == "building" else rng.uniform(5, 16))
        height = {
            "building": rng.uniform(7, 32),
            "vegetation": rng.uniform(2.5, 8),
            "wall": rng.uniform(0.8, 2.6),
            "fence": rng.uniform(1.0, 2.2),
            "gap": 0.0,
        }[kind]
        back_kind = "none"
        if kind == "building":
            back_kind = "building" if rng.random() < 0.4 else "none"
        elif kind in ("wall", "fence", "gap"):
            back_kind = ("vegetation", "building", "none")[_pick(rng, _BACK_CUM)]
        back_h = float(height + rng.uniform(4, 20) if kind == "building" else rng.uniform(4, 24))
        segs.append(
            _Segment(
                z0=z,
                z1=z + length,
                kind=kind,
                height=float(height),
                inst=scene.new_inst(),
                back_kind=back_kind,
                back_offset=float(rng.uniform(4, 14)),
                back_height=back_h,
                back_inst=scene.new_inst(),
                floor_h=float(rng.uniform(2.8, 3.6)),
                win_pitch=float(rng.uniform(1.6, 3.2)),
                win_w=float(rng.uniform(0.35, 0.7)),
                win_h=float(rng.uniform(0.35, 0.6)),
                shop=bool(rng.random() < 0.5),
                phase=float(rng.uniform(0, 2 * np.pi)),
            )
        )
        z += length
    return segs


def _facade_parts(
    kind: np.ndarray, s: np.ndarray, t: np.ndarray, seg_arr: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Windows, shop fronts, cornices and fence slats from facade coordinates (s along the
    facade, t height). Returns (part, window cell id)."""
    part = np.zeros(s.shape, np.uint8)
    cell = np.zeros(s.shape, np.int32)
    bld = kind == 0
    if bld.any():
        fh, pitch = seg_arr["floor_h"], seg_arr["win_pitch"]
        fs, ft = s / pitch, t / fh
        col, floor = np.floor(fs), np.floor(ft)
        win = (
            bld
            & (floor >= 1)
            & (t < seg_arr["height"] - 0.8)
            & (fs - col > 0.5 - seg_arr["win_w"] / 2)
            & (fs - col < 0.5 + seg_arr["win_w"] / 2)
            & (ft - floor > 0.3)
            & (ft - floor < 0.3 + seg_arr["win_h"])
        )
        shop = bld & seg_arr["shop"] & (t > 0.4) & (t < 2.5) & ((s / (2 * pitch)) % 1.0 < 0.75)
        cornice = bld & (t > seg_arr["height"] - 0.5)
        part[cornice] = P_CORNICE
        part[shop] = P_SHOP
        part[win] = P_WINDOW
        cell[win] = (floor[win] * 997 + col[win] * 31 + seg_arr["inst"][win]).astype(np.int32)
    fence = kind == 3
    if fence.any():
        slat = fence & ((s * 4.0) % 1.0 < 0.55)
        part[slat] = P_SLAT
    return part, cell


def _seg_arrays(segs: list[_Segment], back: bool) -> dict[str, np.ndarray]:
    kinds = {"building": 0, "vegetation": 1, "wall": 2, "fence": 3, "gap": 4, "none": 5}
    if back:
        return {
            "kind": np.array([kinds[s.back_kind] for s in segs]),
            "height": np.array([s.back_height for s in segs]),
            "inst": np.array([s.back_inst for s in segs]),
            "floor_h": np.array([s.floor_h for s in segs]),
            "win_pitch": np.array([s.win_pitch * 1.1 for s in segs]),
            "win_w": np.array([s.win_w for s in segs]),
            "win_h": np.array([s.win_h for s in segs]),
            "shop": np.zeros(len(segs), bool),
            "phase": np.array([s.phase + 1.0 for s in segs]),
            "offset": np.array([s.back_offset for s in segs]),
        }
    return {
        "kind": np.array([kinds[s.kind] for s in segs]),
        "height": np.array([s.height for s in segs]),
        "inst": np.array([s.inst for s in segs]),
        "floor_h": np.array([s.floor_h for s in segs]),
        "win_pitch": np.array([s.win_pitch for s in segs]),
        "win_w": np.array([s.win_w for s in segs]),
        "win_h": np.array([s.win_h for s in segs]),
        "shop": np.array([s.shop for s in segs]),
        "phase": np.array([s.phase for s in segs]),
        "z0": np.array([s.z0 for s in segs]),
    }


def _bumpy(height: np.ndarray, kind: np.ndarray, s: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Tree-line tops for vegetation (kind 1): the height wobbles along the facade."""
    wobble = 0.9 * np.sin(s * 0.9 + phase) + 0.5 * np.sin(s * 2.3 + 2 * phase)
    return np.where(kind == 1, height + wobble, height)


_KIND_TO_CLASS = np.array([BUILDING, VEGETATION, WALL, FENCE, SKY, SKY])


def _background(rng: np.random.Generator, sc: _Scene) -> dict[str, Any]:
    """Road, sidewalks, facades, the far skyline and the sky, by casting one ray per pixel."""
    h, w, f = sc.h, sc.w, sc.f
    road_w = float(rng.uniform(7.0, 15.0))
    rl = float(rng.uniform(1.8, road_w - 1.8))  # road extends rl to the left of the camera
    rr = road_w - rl
    sw = [float(rng.uniform(1.8, 5.0)), float(rng.uniform(1.8, 5.0))]
    grass = [float(rng.uniform(1, 3)) if rng.random() < 0.35 else 0.0 for _ in range(2)]
    xb = [rl + sw[0] + grass[0], rr + sw[1] + grass[1]]
    z_end = float(rng.uniform(70, 180))
    segs = [_side_segments(rng, sc, z_end), _side_segments(rng, sc, z_end)]
    lane_w = float(rng.uniform(3.0, 3.8))
    n_lanes = max(int(round(road_w / lane_w)), 2)
    lines = -rl + road_w * np.arange(1, n_lanes) / n_lanes
    centre = n_lanes // 2 - 1 if n_lanes % 2 == 0 else -1  # a solid centre line, if any
    zebra = float(rng.uniform(8, 30)) if rng.random() < 0.35 else -1.0

    # Per-ray depths: the ground hit depends on the row only, the facade hit on the column.
    du = (np.arange(w, dtype=np.float32) + 0.5) - np.float32(sc.vx)
    dv = (np.arange(h, dtype=np.float32) + 0.5) - np.float32(sc.yh)
    adu = np.maximum(np.abs(du), 1e-6)
    zg = np.where(dv > 0, f * sc.cam_h / np.maximum(dv, 1e-6), np.inf).astype(np.float32)
    left = du < 0
    zs = (f * np.where(left, xb[0], xb[1]) / adu).astype(np.float32)
    ground = zg[:, None] <= np.minimum(zs, z_end)[None, :]
    sidem = ~ground & (zs <= z_end)[None, :]
    endm = ~ground & ~sidem

    label, part, inst, orient = sc.label, sc.part, sc.inst, sc.orient
    depth, wy, cell = sc.depth, sc.wy, sc.cell

    def paint_ground(r: np.ndarray, c: np.ndarray, behind: bool = False) -> None:
        z = zg[r]
        x = du[c] * z / f
        lft = x < 0
        d = np.where(lft, -x - rl, x - rr)  # distance beyond the road edge
        swp = np.where(lft, sw[0], sw[1])
        if behind:
            lab = np.full(z.shape, TERRAIN, np.uint8)
        else:
            lab = np.where(d < 0, ROAD, np.where(d < swp, SIDEWALK, TERRAIN)).astype(np.uint8)
        prt = np.zeros(z.shape, np.uint8)
        prt[(lab == SIDEWALK) & (d < 0.25)] = P_CURB
        road = lab == ROAD
        dist = np.abs(x[:, None] - lines[None, :])
        near = dist.argmin(axis=1)
        on_line = dist[np.arange(len(near)), near] < 0.08
        dashed = (z % 9.0 < 3.5) | (near == centre)
        edge = (np.abs(x + rl - 0.35) < 0.07) | (np.abs(x - rr + 0.35) < 0.07)
        mark = road & ((on_line & dashed) | edge)
        if zebra > 0:
            mark |= road & (z > zebra) & (z < zebra + 3.5) & ((x * 1.6) % 1.0 < 0.5)
        prt[mark] = P_MARK
        label[r, c], part[r, c], orient[r, c] = lab, prt, O_GROUND
        depth[r, c], wy[r, c] = z, 0.0

    paint_ground(*np.nonzero(ground))

    # --- street sides
    for side in (0, 1):
        rows, cols = np.nonzero(sidem & (left if side == 0 else ~left)[None, :])
        if rows.size == 0:
            continue
        seg_list = segs[side]
        fa = _seg_arrays(seg_list, back=False)
        z = zs[cols]
        dvp = dv[rows]
        idx = np.clip(np.searchsorted(fa["z0"], z, side="right") - 1, 0, len(seg_list) - 1)
        t = sc.cam_h - dvp * z / f
        kind = fa["kind"][idx]
        top = _bumpy(fa["height"][idx], kind, z, fa["phase"][idx])
        hit = (t <= top) & (kind < 4)
        o = O_LEFT_FACADE if side == 0 else O_RIGHT_FACADE
        sub = {k: v[idx[hit]] for k, v in fa.items()}
        prt, cl = _facade_parts(kind[hit], z[hit], t[hit], sub)
        r, c = rows[hit], cols[hit]
        label[r, c] = _KIND_TO_CLASS[kind[hit]]
        inst[r, c] = sub["inst"]
        part[r, c], cell[r, c] = prt, cl
        orient[r, c], depth[r, c], wy[r, c] = o, z[hit], t[hit]
        # rays passing over: the plane behind, the ground behind, or the sky
        miss = ~hit
        if not miss.any():
            continue
        r, c = rows[miss], cols[miss]
        ba = _seg_arrays(seg_list, back=True)
        bsub = {k: v[idx[miss]] for k, v in ba.items()}
        z2 = f * (xb[side] + bsub["offset"]) / adu[c]
        t2 = sc.cam_h - dvp[miss] * z2 / f
        top2 = _bumpy(bsub["height"], bsub["kind"], z2, bsub["phase"])
        hit2 = (t2 <= top2) & (bsub["kind"] < 5) & (t2 >= 0)
        gnd = ~hit2 & (dvp[miss] > 0)  # the ray goes on down to the ground
        hr, hc = r[hit2], c[hit2]
        label[hr, hc] = _KIND_TO_CLASS[bsub["kind"][hit2]]
        inst[hr, hc] = bsub["inst"][hit2]
        sub2 = {k: v[hit2] for k, v in bsub.items()}
        prt2, cl2 = _facade_parts(sub2["kind"], z2[hit2], t2[hit2], sub2)
        part[hr, hc], cell[hr, hc] = prt2, cl2
        orient[hr, hc], depth[hr, hc], wy[hr, hc] = o, z2[hit2], t2[hit2]
        if gnd.any():
            paint_ground(r[gnd], c[gnd], behind=True)

    # --- the far end of the street: a frontal skyline at z_end
    edges = np.cumsum(rng.uniform(6, 22, size=12)) - xb[0] - 3
    heights = rng.uniform(6, 40, size=13)
    kinds = np.where(rng.random(13) < 0.8, 0, 1)
    insts = np.array([sc.new_inst() for _ in range(13)])
    rows, cols = np.nonzero(endm)
    if rows.size:
        x = du[cols] * z_end / f
        t = sc.cam_h - dv[rows] * z_end / f
        j = np.searchsorted(edges, x)
        kind = kinds[j]
        top = _bumpy(heights[j], kind, x, np.zeros_like(x))
        hit = t <= top
        r, c = rows[hit], cols[hit]
        label[r, c] = _KIND_TO_CLASS[kind[hit]]
        inst[r, c] = insts[j[hit]]
        jh = j[hit]
        sub = {
            "floor_h": np.full(jh.shape, 3.2),
            "win_pitch": np.full(jh.shape, 2.6),
            "win_w": np.full(jh.shape, 0.5),
            "win_h": np.full(jh.shape, 0.5),
            "shop": np.zeros(jh.shape, bool),
            "height": heights[jh],
            "inst": insts[jh],
        }
        prt, cl = _facade_parts(kind[hit], x[hit], t[hit], sub)
        part[r, c], cell[r, c] = prt, cl
        orient[r, c], depth[r, c], wy[r, c] = O_FRONT, z_end, t[hit]

    return {"rl": rl, "rr": rr, "sw": sw, "xb": xb, "z_end": z_end, "lines": lines}


# =========================================================================== objects


def _draw_vehicle(
    sc: _Scene, x: float, z: float, facing_away: bool, bus: bool, rng: np.random.Generator
) -> None:
    cls = BUS if bus else CAR
    inst = sc.new_inst()
    w = 2.5 if bus else float(rng.uniform(1.7, 1.95))
    length = float(rng.uniform(10, 12.5)) if bus else float(rng.uniform(3.9, 4.8))
    height = 3.1 if bus else float(rng.uniform(1.4, 1.65))
    body_top = height if bus else 0.95
    clear, wheel_r = (0.35, 0.5) if bus else (0.28, 0.32)
    hw = w / 2
    # side face (visible when the car is off to one side)
    xs = x - hw if x > 0 else x + hw
    if abs(x) > hw + 0.05:
        got = sc.side(xs, z, z + length, 0.0, height)
        if got is not None:
            sl, zz, yy, inside = got
            if bus:
                shape = inside & (yy >= clear)
                glass = shape & (yy > 1.2) & (yy < 2.6) & (((zz - z) / 1.6) % 1.0 < 0.85)
            else:
                k = np.clip((yy - body_top) / (height - body_top), 0, 1)
                c0 = z + 0.22 * length + 0.3 * k
                c1 = z + 0.78 * length - 0.45 * k
                body = inside & (yy >= clear) & (yy <= body_top)
                cabin = inside & (yy > body_top) & (zz >= c0) & (zz <= c1)
                shape = body | cabin
                glass = cabin & (yy > body_top + 0.05) & (yy < height - 0.07)
                glass &= (zz > c0 + 0.08) & (zz < c1 - 0.08)
            wheels = np.zeros_like(inside)
            for zc in (z + 0.8 + wheel_r, z + length - 0.8 - wheel_r):
                wheels |= inside & ((zz - zc) ** 2 + (yy - wheel_r) ** 2 < wheel_r**2)
            prt = np.where(wheels, P_TIRE, np.where(glass, P_GLASS, P_BASE)).astype(np.uint8)
            o = O_LEFT_FACADE if xs < 0 else O_RIGHT_FACADE
            sc.paint(sl, shape | wheels, cls, inst, zz, yy, prt, o)
    # the face towards the camera
    got = sc.frontal(z, x - hw, x + hw, 0.0, height)
    if got is None:
        return
    sl, xx, yy = got
    dx = np.abs(xx - x)
    if bus:
        shape = (dx <= hw) & (yy >= clear)
        glass = shape & (yy > 1.4) & (yy < 2.8) & (dx < hw - 0.15)
    else:
        k = np.clip((yy - body_top) / (height - body_top), 0, 1)
        body = (dx <= hw) & (yy >= clear) & (yy <= body_top)
        cabin = (yy > body_top) & (yy <= height) & (dx <= hw - 0.12 - 0.2 * k)
        shape = body | cabin
        glass = cabin & (yy > body_top + 0.05) & (yy < height - 0.06) & (dx < hw - 0.25 - 0.2 * k)
    tyres = (yy < clear + 0.05) & (dx > hw - 0.35) & (dx < hw - 0.05)
    lamp_y = (1.0, 1.25) if bus else (0.72, 0.86)
    lamps = shape & (yy > lamp_y[0]) & (yy < lamp_y[1]) & (dx > hw - 0.4) & (dx < hw - 0.05)
    plate = shape & (dx < 0.26) & (yy > clear + 0.12) & (yy < clear + 0.26)
    prt = np.full(yy.shape[:1] + xx.shape[1:], P_BASE, np.uint8)
    prt[np.broadcast_to(glass, prt.shape)] = P_GLASS
    prt[np.broadcast_to(tyres, prt.shape)] = P_TIRE
    prt[np.broadcast_to(lamps, prt.shape)] = P_TAIL if facing_away else P_HEAD
    prt[np.broadcast_to(plate, prt.shape)] = P_PLATE
    sc.paint(sl, shape | tyres, cls, inst, z, np.broadcast_to(yy, prt.shape), prt)
    kind = 1 if facing_away else 2
    ly = (lamp_y[0] + lamp_y[1]) / 2
    for lx in (x - hw + 0.2, x + hw - 0.2):
        sc.lights.append((sc.u_of(lx, z), sc.v_of(ly, z), sc.f * 0.2 / z, kind))


def _draw_person(sc: _Scene, x: float, z: float, rng: np.random.Generator) -> None:
    hp = float(rng.uniform(1.55, 1.9))
    got = sc.frontal(z, x - 0.3 * hp, x + 0.3 * hp, 0.0, hp)
    if got is None:
        return
    sl, xx, yy = got
    dx, y = xx - x, yy / hp
    stride = float(rng.uniform(0.0, 0.12))
    leg_c = 0.045 + stride * np.clip(1 - y / 0.47, 0, 1)
    legs = (y < 0.48) & (np.abs(np.abs(dx / hp) - leg_c) < 0.04)
    torso = (y >= 0.46) & (y < 0.82) & (np.abs(dx / hp) < 0.11 - 0.02 * (0.82 - y))
    arms = (y >= 0.5) & (y < 0.8) & (np.abs(dx / hp) >= 0.1) & (np.abs(dx / hp) < 0.145)
    head = (dx / (0.065 * hp)) ** 2 + ((y - 0.9) / 0.08) ** 2 < 1
    hair = head & (y > 0.92)
    shape = legs | torso | arms | head
    prt = np.where(hair, P_HAIR, np.where(head, P_SKIN, np.where(legs, P_LEGS, P_BASE)))
    sc.paint(
        sl, shape, PERSON, sc.new_inst(), z, np.broadcast_to(yy, shape.shape), prt.astype(np.uint8)
    )


def _min_half(sc: _Scene, half: float, z: float) -> float:
    """Half-width in metres, widened to at least half a pixel so thin things stay visible."""
    return max(half, 0.5 * z / sc.f)


def _draw_pole(
    sc: _Scene, x: float, z: float, toward_road: float, rng: np.random.Generator
) -> None:
    kind = ("sign", "light", "lamp", "plain")[_pick(rng, _POLE_CUM)]
    hp = float(rng.uniform(3.2, 4.5) if kind == "sign" else rng.uniform(5.5, 8.5))
    inst = sc.new_inst()
    hw = _min_half(sc, 0.07, z)
    got = sc.frontal(z, x - hw, x + hw, 0.0, hp)
    if got is not None:
        sl, xx, yy = got
        m = np.broadcast_to((np.abs(xx - x) <= hw) & (yy <= hp), (yy.shape[0], xx.shape[1]))
        sc.paint(sl, m, POLE, inst, z, np.broadcast_to(yy, m.shape))
    if kind == "sign":
        shape = ("circle", "triangle", "square")[int(rng.integers(3))]
        r = _min_half(sc, 0.33, z)
        cy = hp - r
        got = sc.frontal(z, x - r, x + r, cy - r, cy + r)
        if got is None:
            return
        sl, xx, yy = got
        dx, dy = (xx - x) / r, (yy - cy) / r
        if shape == "circle":
            rr = dx**2 + dy**2
            m, face = rr < 1, rr < 0.6
        elif shape == "triangle":
            m = (dy > -0.8) & (np.abs(dx) < (0.9 - dy) * 0.62)
            face = (dy > -0.55) & (np.abs(dx) < (0.65 - dy) * 0.55)
        else:
            m = (np.abs(dx) < 0.85) & (np.abs(dy) < 0.85)
            face = (np.abs(dx) < 0.65) & (np.abs(dy) < 0.65)
        m = np.broadcast_to(m, (yy.shape[0], xx.shape[1]))
        prt = np.where(face, P_SIGN_FACE, P_SIGN_RIM).astype(np.uint8)
        sc.paint(sl, m, SIGN, sc.new_inst(), z - 0.05, np.broadcast_to(yy, m.shape), prt)
    elif kind in ("light", "lamp"):
        arm = float(rng.uniform(1.5, 4.0)) * toward_road
        ay = hp - 0.25
        ah = _min_half(sc, 0.05, z)
        x0, x1 = sorted((x, x + arm))
        got = sc.frontal(z, x0, x1, ay - ah, ay + ah)
        if got is not None:
            sl, xx, yy = got
            m = np.ones((yy.shape[0], xx.shape[1]), bool)
            sc.paint(sl, m, POLE, inst, z, np.broadcast_to(yy, m.shape))
        xe = x + arm
        if kind == "lamp":
            lw, lh = _min_half(sc, 0.3, z), _min_half(sc, 0.08, z)
            got = sc.frontal(z, xe - lw, xe + lw, ay - lh - 0.1, ay)
            if got is not None:
                sl, xx, yy = got
                m = np.ones((yy.shape[0], xx.shape[1]), bool)
                prt = np.where(yy < ay - 0.1, P_LAMP, P_BASE).astype(np.uint8)
                prt = np.broadcast_to(prt, m.shape)
                sc.paint(sl, m, POLE, inst, z - 0.05, np.broadcast_to(yy, m.shape), prt)
            sc.lights.append((sc.u_of(xe, z), sc.v_of(ay - 0.15, z), sc.f * 1.2 / z, 0))
        else:
            bw, bh = _min_half(sc, 0.18, z), 0.5
            top = ay - 0.05
            got = sc.frontal(z, xe - bw, xe + bw, top - 2 * bh, top)
            if got is None:
                return
            sl, xx, yy = got
            m = np.ones((yy.shape[0], xx.shape[1]), bool)
            dy = (top - yy) / (2 * bh)  # 0 at the top, 1 at the bottom
            lamp = (np.abs(xx - xe) < bw * 0.6) & ((dy * 3) % 1.0 > 0.2) & ((dy * 3) % 1.0 < 0.8)
            which = np.clip((dy * 3).astype(int), 0, 2)
            codes = np.array([P_TL_RED, P_TL_YELLOW, P_TL_GREEN], np.uint8)[which]
            prt = np.where(lamp, codes, P_BASE).astype(np.uint8)
            prt = np.broadcast_to(prt, m.shape)
            sc.paint(sl, m, LIGHT, sc.new_inst(), z - 0.05, np.broadcast_to(yy, m.shape), prt)
            state = int(rng.integers(3))
            sc.lights.append(
                (
                    sc.u_of(xe, z),
                    sc.v_of(top - bh * (2 * state + 1) / 3, z),
                    sc.f * 0.4 / z,
                    3 + state,
                )
            )


def _draw_tree(sc: _Scene, x: float, z: float, rng: np.random.Generator) -> None:
    ht = float(rng.uniform(4, 9))
    crown_r = float(rng.uniform(1.2, 2.6))
    inst = sc.new_inst()
    tw = _min_half(sc, 0.12, z)
    got = sc.frontal(z, x - tw, x + tw, 0.0, ht - crown_r)
    if got is not None:
        sl, xx, yy = got
        m = np.ones((yy.shape[0], xx.shape[1]), bool)
        prt = np.full(m.shape, P_TRUNK, np.uint8)
        sc.paint(sl, m, VEGETATION, inst, z, np.broadcast_to(yy, m.shape), prt)
    cy = ht - crown_r
    blobs = [(0.0, 0.0, crown_r)] + [
        (
            float(rng.uniform(-0.6, 0.6)) * crown_r,
            float(rng.uniform(-0.3, 0.5)) * crown_r,
            float(rng.uniform(0.5, 0.8)) * crown_r,
        )
        for _ in range(3)
    ]
    ext = crown_r * 1.6
    got = sc.frontal(z - 0.1, x - ext, x + ext, cy - ext, cy + ext)
    if got is None:
        return
    sl, xx, yy = got
    m = np.zeros((yy.shape[0], xx.shape[1]), bool)
    for bx, by, br in blobs:
        m |= (xx - x - bx) ** 2 + ((yy - cy - by) * 1.15) ** 2 < br**2
    sc.paint(sl, m, VEGETATION, inst, z - 0.1, np.broadcast_to(yy, m.shape))


def _objects(rng: np.random.Generator, sc: _Scene, bg: dict[str, Any]) -> None:
    rl, rr, sw, z_end = bg["rl"], bg["rr"], bg["sw"], bg["z_end"]
    zmax = min(z_end - 8.0, 70.0)
    items: list[tuple[float, Callable[[], None]]] = []

    # vehicles in lanes and parked at the curb; one per (lane, 8 m) slot
    lines = np.concatenate([[-rl], bg["lines"], [rr]])
    centres = (lines[:-1] + lines[1:]) / 2
    taken: set[tuple[int, int]] = set()
    for _ in range(int(rng.integers(2, 9))):
        lane = int(rng.integers(len(centres)))
        bus = rng.random() < 0.12
        z = float(rng.uniform(5.0, zmax))
        length = 12 if bus else 5
        slots = {(lane, int(zz // 8)) for zz in np.arange(z, z + length, 4.0)}
        if slots & taken:
            continue
        taken |= slots
        x = float(centres[lane] + rng.uniform(-0.3, 0.3))
        away = bool(x > -0.5) if rng.random() < 0.8 else bool(rng.random() < 0.5)
        items.append((z, lambda x=x, z=z, a=away, b=bus: _draw_vehicle(sc, x, z, a, b, rng)))
    for side, edge in ((-1, -rl), (1, rr)):
        z = float(rng.uniform(4, 12))
        while z < zmax and rng.random() < 0.75:
            x = edge - side * 1.1
            items.append((z, lambda x=x, z=z: _draw_vehicle(sc, x, z, True, False, rng)))
            z += float(rng.uniform(5.5, 14))

    # pedestrians on the sidewalks (and now and then on a crossing)
    for _ in range(int(rng.integers(0, 8))):
        side = int(rng.integers(2))
        edge, width = (rl, sw[0]) if side == 0 else (rr, sw[1])
        off = edge + float(rng.uniform(0.4, max(width - 0.4, 0.5)))
        x = -off if side == 0 else off
        z = float(rng.uniform(3.0, 45.0))
        items.append((z, lambda x=x, z=z: _draw_person(sc, x, z, rng)))
    if rng.random() < 0.25:
        z = float(rng.uniform(6, 25))
        x = float(rng.uniform(-rl + 0.5, rr - 0.5))
        items.append((z, lambda x=x, z=z: _draw_person(sc, x, z, rng)))

    # poles and trees along the curbs
    for side, edge in ((-1, -rl), (1, rr)):
        z = float(rng.uniform(3, 12))
        while z < zmax:
            x = edge - side * 0.45
            items.append((z, lambda x=x, z=z, t=side: _draw_pole(sc, x, z, -t, rng)))
            z += float(rng.uniform(10, 28))
        z = float(rng.uniform(4, 16))
        while z < zmax and rng.random() < 0.6:
            x = edge - side * float(rng.uniform(1.0, 1.6))
            items.append((z, lambda x=x, z=z: _draw_tree(sc, x, z, rng)))
            z += float(rng.uniform(8, 22))

    items.sort(key=lambda it: -it[0])  # painter's algorithm: far to near
    for _, draw in items:
        draw()


def _layout(seed: int, size: tuple[int, int]) -> _Scene:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    h, w = size
    sc = _Scene(
        h=h,
        w=w,
        f=float(w * rng.uniform(0.62, 0.85)),
        vx=float(w * (0.5 + rng.uniform(-0.08, 0.08))),
        yh=float(h * rng.uniform(0.36, 0.5)),
        cam_h=float(rng.uniform(1.3, 1.8)),
    )
    bg = _background(rng, sc)
    _objects(rng, sc, bg)
    return sc


# =========================================================================== appearance


def _rgb(values: Sequence[Sequence[int]]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# Per class: candidate colours for instances (the first one is used for stuff).
_GAME_CLASS = {
    ROAD: _rgb([[92, 88, 102]]),
    SIDEWALK: _rgb([[214, 160, 150]]),
    BUILDING: _rgb(
        [
            [205, 70, 55],
            [235, 190, 50],
            [70, 120, 215],
            [230, 130, 50],
            [160, 90, 200],
            [225, 225, 225],
        ]
    ),
    WALL: _rgb([[200, 160, 100]]),
    FENCE: _rgb([[160, 110, 60]]),
    POLE: _rgb([[120, 120, 140]]),
    LIGHT: _rgb([[40, 40, 40]]),
    SIGN: _rgb([[235, 235, 40]]),
    VEGETATION: _rgb([[50, 185, 50], [70, 200, 40]]),
    TERRAIN: _rgb([[160, 220, 80]]),
    SKY: _rgb([[90, 170, 255]]),
    PERSON: _rgb([[230, 40, 40], [40, 80, 230], [250, 200, 30], [40, 190, 200], [230, 90, 200]]),
    CAR: _rgb(
        [
            [220, 30, 30],
            [30, 70, 220],
            [250, 210, 20],
            [245, 245, 245],
            [30, 160, 60],
            [250, 120, 20],
        ]
    ),
    BUS: _rgb([[245, 190, 20], [220, 40, 40]]),
}
_REAL_CLASS = {
    ROAD: _rgb([[78, 78, 82]]),
    SIDEWALK: _rgb([[150, 148, 142]]),
    BUILDING: _rgb(
        [
            [196, 182, 160],
            [150, 148, 146],
            [135, 80, 62],
            [218, 212, 200],
            [96, 92, 88],
            [170, 150, 120],
        ]
    ),
    WALL: _rgb([[140, 130, 118]]),
    FENCE: _rgb([[90, 92, 88]]),
    POLE: _rgb([[88, 92, 96]]),
    LIGHT: _rgb([[25, 28, 25]]),
    SIGN: _rgb([[30, 80, 160]]),
    VEGETATION: _rgb([[58, 82, 38], [70, 92, 45], [48, 70, 40]]),
    TERRAIN: _rgb([[108, 122, 70]]),
    SKY: _rgb([[175, 198, 226]]),
    PERSON: _rgb([[40, 40, 45], [70, 60, 55], [120, 110, 100], [50, 60, 90], [150, 140, 120]]),
    CAR: _rgb(
        [
            [200, 200, 202],
            [30, 30, 34],
            [120, 124, 130],
            [60, 70, 95],
            [110, 30, 35],
            [215, 210, 200],
        ]
    ),
    BUS: _rgb([[200, 200, 195], [60, 90, 130]]),
}
# Per part (overrides the class colour).
_GAME_PART = {
    P_MARK: _rgb([[255, 255, 255]]),
    P_CURB: _rgb([[235, 235, 235]]),
    P_WINDOW: _rgb([[40, 70, 150]]),
    P_GLASS: _rgb([[60, 90, 160]]),
    P_TIRE: _rgb([[20, 20, 20]]),
    P_TAIL: _rgb([[255, 0, 0]]),
    P_HEAD: _rgb([[255, 255, 180]]),
    P_TRUNK: _rgb([[130, 80, 30]]),
    P_SKIN: _rgb([[240, 190, 150]]),
    P_LEGS: _rgb([[30, 30, 160], [20, 20, 20], [200, 100, 30]]),
    P_SIGN_FACE: _rgb([[250, 250, 250], [255, 230, 0]]),
    P_SIGN_RIM: _rgb([[230, 0, 0], [0, 70, 230]]),
    P_TL_RED: _rgb([[255, 30, 30]]),
    P_TL_YELLOW: _rgb([[255, 220, 0]]),
    P_TL_GREEN: _rgb([[30, 255, 60]]),
    P_SLAT: _rgb([[190, 140, 80]]),
    P_LAMP: _rgb([[255, 255, 200]]),
    P_HAIR: _rgb([[60, 30, 10], [250, 220, 80], [20, 20, 20]]),
    P_SHOP: _rgb([[80, 200, 230]]),
    P_PLATE: _rgb([[255, 255, 255]]),
    P_CORNICE: _rgb([[250, 250, 250]]),
}
_REAL_PART = {
    P_MARK: _rgb([[196, 196, 188]]),
    P_CURB: _rgb([[168, 166, 160]]),
    P_WINDOW: _rgb([[58, 66, 74], [80, 90, 100], [40, 44, 48]]),
    P_GLASS: _rgb([[38, 44, 52]]),
    P_TIRE: _rgb([[22, 22, 24]]),
    P_TAIL: _rgb([[150, 25, 25]]),
    P_HEAD: _rgb([[210, 210, 200]]),
    P_TRUNK: _rgb([[70, 58, 45]]),
    P_SKIN: _rgb([[200, 160, 130], [120, 85, 60], [225, 190, 165]]),
    P_LEGS: _rgb([[45, 55, 80], [30, 30, 32], [110, 100, 85]]),
    P_SIGN_FACE: _rgb([[220, 220, 215], [40, 90, 170]]),
    P_SIGN_RIM: _rgb([[170, 30, 35], [215, 215, 210]]),
    P_TL_RED: _rgb([[150, 40, 35]]),
    P_TL_YELLOW: _rgb([[150, 120, 40]]),
    P_TL_GREEN: _rgb([[40, 130, 80]]),
    P_SLAT: _rgb([[70, 72, 70]]),
    P_LAMP: _rgb([[200, 200, 190]]),
    P_HAIR: _rgb([[40, 30, 25], [120, 90, 60], [20, 20, 20]]),
    P_SHOP: _rgb([[70, 80, 85]]),
    P_PLATE: _rgb([[220, 220, 210]]),
    P_CORNICE: _rgb([[170, 165, 155]]),
}


def _tables(class_pal: dict[int, np.ndarray], part_pal: dict[int, np.ndarray], k: int = 8):
    cls = np.zeros((256, k, 3), np.float32)
    for c, cols in class_pal.items():
        cls[c] = cols[np.arange(k) % len(cols)]
    prt = np.zeros((N_PARTS, k, 3), np.float32)
    for p, cols in part_pal.items():
        prt[p] = cols[np.arange(k) % len(cols)]
    return cls, prt


_TABLES = {
    "game": _tables(_GAME_CLASS, _GAME_PART),
    "realistic": _tables(_REAL_CLASS, _REAL_PART),
}


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1): a random (cells+1)^2 grid, bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, h, endpoint=False, dtype=np.float32)
    xs = np.linspace(0, cells, w, endpoint=False, dtype=np.float32)
    y0, x0 = ys.astype(int), xs.astype(int)
    ty, tx = (ys - y0)[:, None], (xs - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - tx) + g01 * tx) * (1 - ty) + (g10 * (1 - tx) + g11 * tx) * ty


def _noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _blur(img: np.ndarray, passes: int = 1) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur with edge replication."""
    for _ in range(passes):
        p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
        img = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) * 0.25
    return img


def _base_colours(sc: _Scene, kind: str, rng: np.random.Generator) -> np.ndarray:
    cls_tab, part_tab = _TABLES[kind]
    k = cls_tab.shape[1]
    choice = rng.integers(0, k, size=sc.n_inst + 1)
    choice[0] = 0
    ch = choice[sc.inst]
    img = cls_tab[sc.label, ch]
    has_part = sc.part > 0
    img[has_part] = part_tab[sc.part[has_part], ch[has_part]]
    shade = {
        "game": np.array([1.0, 1.0, 0.78, 0.92, 1.0], np.float32),
        "realistic": np.array([1.0, 0.92, 0.7, 0.85, 1.0], np.float32),
    }[kind]
    if rng.random() < 0.5:  # the sun comes from the other side
        shade[[1, 2]] = shade[[2, 1]]
    return img * shade[sc.orient][..., None]


def _sky_gradient(sc: _Scene, top: Sequence[float], bottom: Sequence[float]) -> np.ndarray:
    t = np.clip((np.arange(sc.h, dtype=np.float32) + 0.5) / max(sc.yh, 1.0), 0, 1)[:, None, None]
    return np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t


def _fill_sky(img: np.ndarray, sc: _Scene, top: Sequence[float], bottom: Sequence[float]) -> None:
    sky = sc.label == SKY
    img[sky] = np.broadcast_to(_sky_gradient(sc, top, bottom), img.shape)[sky]


def _realistic(sc: _Scene, rng: np.random.Generator) -> np.ndarray:
    h, w = sc.h, sc.w
    img = _base_colours(sc, "realistic", rng)
    sky = sc.label == SKY
    clouds = _value_noise(rng, h, w, 4) * 0.6 + _value_noise(rng, h, w, 9) * 0.4
    sky_col = _sky_gradient(sc, (120, 160, 215), (215, 225, 235))
    sky_col = sky_col + (np.clip(clouds - 0.45, 0, 1) * 160.0)[..., None]
    img[sky] = np.broadcast_to(sky_col, img.shape)[sky]
    # textures: large blotches everywhere, fine grain on rough stuff, leaves on vegetation
    blotch = _value_noise(rng, h, w, max(w // 16, 2)) - 0.5
    grain = rng.standard_normal((h, w), dtype=np.float32)
    rough = np.isin(sc.label, (ROAD, SIDEWALK, TERRAIN, WALL, BUILDING))
    leafy = sc.label == VEGETATION
    tex = blotch * 28.0 + grain * np.where(rough, 7.0, np.where(leafy, 22.0, 2.0))
    img += np.where(sky, 0.0, tex)[..., None]
    # aerial perspective: far things fade towards the horizon colour
    haze = 1.0 - np.exp(-sc.depth / 260.0)
    img = img * (1 - haze[..., None] * 0.5) + np.asarray([200, 208, 218], np.float32) * (
        haze[..., None] * 0.5
    )
    # exposure, white balance, vignetting, optics and sensor
    img *= rng.uniform(0.85, 1.12) * rng.uniform(0.94, 1.06, size=3).astype(np.float32)
    ys = ((np.arange(h, dtype=np.float32) + 0.5) / h - 0.5) ** 2
    xs = ((np.arange(w, dtype=np.float32) + 0.5) / w - 0.5) ** 2
    img *= (1 - 0.5 * (ys[:, None] + xs[None, :]))[..., None]
    img = _blur(img)
    return img + _noise(rng, img.shape, 3.0)


def _fog(sc: _Scene, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    beta = rng.uniform(0.025, 0.07)
    trans = np.exp(-beta * np.minimum(sc.depth, 400.0))[..., None]
    air = np.asarray([200, 203, 206], np.float32) * rng.uniform(0.9, 1.05)
    img = img * trans + air * (1 - trans)
    grey = img.mean(axis=-1, keepdims=True)
    img = 0.6 * img + 0.4 * grey
    return _blur(img) + _noise(rng, img.shape, 2.0)


def _glow(
    img: np.ndarray,
    lights: list[tuple[float, float, float, int]],
    colours: dict[int, Sequence[float]],
    gain: float,
) -> None:
    h, w = img.shape[:2]
    for u, v, r, kind in lights:
        r = max(r, 1.5)
        rad = int(3 * r) + 1
        r0, r1 = max(int(v) - rad, 0), min(int(v) + rad + 1, h)
        c0, c1 = max(int(u) - rad, 0), min(int(u) + rad + 1, w)
        if r0 >= r1 or c0 >= c1:
            continue
        yy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - v
        xx = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - u
        fall = np.exp(-(xx**2 + yy**2) / (2 * r * r))
        img[r0:r1, c0:c1] += gain * fall[..., None] * np.asarray(colours[kind], np.float32)


def _night(sc: _Scene, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img * rng.uniform(0.09, 0.16)
    _fill_sky(img, sc, (4, 6, 16), (22, 22, 34))
    salt = int(rng.integers(1 << 30))
    lit = (sc.part == P_WINDOW) & (((sc.cell.astype(np.int64) * 2654435761 + salt) >> 7) % 7 < 3)
    img[lit] = np.asarray([235, 190, 110], np.float32) * rng.uniform(0.6, 1.0)
    img[sc.part == P_SHOP] = np.asarray([200, 180, 140], np.float32)
    lamps = {P_HEAD: (255, 250, 225), P_TAIL: (255, 30, 20), P_LAMP: (255, 220, 160)}
    for p, c in lamps.items():
        img[sc.part == p] = np.asarray(c, np.float32)
    colours = {
        0: (255, 190, 110),
        1: (255, 30, 20),
        2: (255, 245, 210),
        3: (255, 40, 30),
        4: (255, 190, 0),
        5: (40, 255, 90),
    }
    _glow(img, sc.lights, colours, 0.9)
    # pools of lamp light on the ground below each lamp
    ground = (sc.orient == O_GROUND)[..., None]
    pools = np.zeros_like(img)
    lamp_lights = [(u, v, r * 2.5, 0) for u, v, r, k in sc.lights if k == 0]
    _glow(pools, lamp_lights, colours, 0.25)
    img += pools * ground
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** 0.85
    return img + _noise(rng, img.shape, 4.0)


def _rain(sc: _Scene, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = sc.h, sc.w
    grey = img.mean(axis=-1, keepdims=True)
    img = (0.55 * img + 0.45 * grey) * rng.uniform(0.6, 0.75)
    _fill_sky(img, sc, (125, 130, 138), (165, 168, 172))
    # wet road: darker with a sheen that brightens towards the horizon
    road = (sc.label == ROAD) & (sc.part == P_BASE)
    sheen = np.clip(1.0 - (np.arange(h, dtype=np.float32)[:, None] - sc.yh) / (h - sc.yh + 1), 0, 1)
    img[road] = (img * 0.75 + 60.0 * np.broadcast_to(sheen, (h, w))[..., None])[road]
    # streaks: sparse drops smeared along a slanted direction
    drops = (rng.random((h, w)) < 0.012).astype(np.float32)
    slant = int(rng.integers(-1, 2))
    length = max(h // 20, 3)
    streak = np.zeros_like(drops)
    for k in range(length):
        streak += np.roll(np.roll(drops, k, axis=0), (k * slant) // 3, axis=1)
    img = img + 45.0 * np.clip(streak, 0, 1)[..., None]
    img = _blur(img, 2)
    return img + _noise(rng, img.shape, 3.0)


def _snow(sc: _Scene, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = sc.h, sc.w
    _fill_sky(img, sc, (190, 195, 205), (222, 225, 232))
    cover = (
        _value_noise(rng, h, w, max(w // 12, 2)) * 0.75
        + _value_noise(rng, h, w, max(w // 4, 2)) * 0.25
    )
    flat = np.isin(sc.label, (ROAD, SIDEWALK, TERRAIN)) & (sc.orient == O_GROUND)
    amount = np.where(sc.label == ROAD, rng.uniform(0.3, 0.55), 0.9)
    snow_mask = flat & (cover < amount)
    white = np.asarray([232, 236, 244], np.float32)
    img[snow_mask] = img[snow_mask] * 0.2 + white * 0.8
    tops = (sc.label == VEGETATION) & (rng.random((h, w)) < 0.35)
    img[tops] = img[tops] * 0.4 + white * 0.6
    img = img * 0.75 + np.asarray([205, 210, 220], np.float32) * 0.25  # low contrast, cold
    flakes = rng.random((h, w)) < 0.02
    img[flakes] = white
    img = _blur(img)
    return img + _noise(rng, img.shape, 3.0)


_EFFECTS = {"fog": _fog, "night": _night, "rain": _rain, "snow": _snow}


def _shade(sc: _Scene, style: str, seed: int) -> np.ndarray:
    def stream(name: str) -> np.random.Generator:
        return np.random.default_rng(
            np.random.SeedSequence([int(seed), 0xC010, STYLES.index(name)])
        )

    if style == SOURCE_STYLE:
        img = _base_colours(sc, "game", stream(style))
        _fill_sky(img, sc, (60, 140, 255), (150, 205, 255))
    else:
        # the weather styles share the realistic base of the seed (same scene, other weather)
        img = _realistic(sc, stream("realistic"))
        if style in _EFFECTS:
            img = _EFFECTS[style](sc, img, stream(style))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(
    seed: int, size: tuple[int, int] = (128, 128), style: str = SOURCE_STYLE
) -> tuple[np.ndarray, np.ndarray]:
    """Render one street scene.

    Args:
        seed: the scene; the layout (and so the label map) depends on it alone.
        size: (H, W) in pixels.
        style: one of ``STYLES`` (``"game"`` or a target style).

    Returns ``(image uint8 (H, W, 3) RGB, label uint8 (H, W) trainIds)``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    h, w = int(size[0]), int(size[1])
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8x8, got {size}")
    sc = _layout(seed, (h, w))
    return _shade(sc, style, seed), sc.label.copy()


# =========================================================================== dataset


class SyntheticDataset(SegDataset):
    """``num_images`` rendered scenes of one style (or several, cycled by index).

    Scene ``i`` of split ``split`` uses a seed derived from ``(seed, split, i)``, so train
    and val scenes differ, and the same index has the same layout in every style. Samples
    have the same format as the file datasets; ``meta["image_path"]`` reads like
    ``synthetic://game/train/3``.
    """

    name = "synthetic"

    def __init__(
        self,
        num_images: int = 100,
        style: str | Sequence[str] = SOURCE_STYLE,
        size: tuple[int, int] = (128, 128),
        seed: int = 0,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        split: str = "train",
    ) -> None:
        super().__init__([], transform=transform)
        styles = (style,) if isinstance(style, str) else tuple(style)
        for s in styles:
            if s not in STYLES:
                raise ValueError(f"unknown style {s!r}; choose one of {', '.join(STYLES)}")
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self.num_images = int(num_images)
        self.styles = styles
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.split = split
        self._split_code = sum(ord(ch) * 131**i for i, ch in enumerate(split)) % (1 << 31)

    def __len__(self) -> int:
        return self.num_images

    def scene_seed(self, index: int) -> int:
        """The ``render_scene`` seed of sample ``index``."""
        ss = np.random.SeedSequence([self.seed, self._split_code, int(index)])
        return int(ss.generate_state(1)[0])

    def load(self, index: int) -> dict[str, Any]:
        style = self.styles[index % len(self.styles)]
        seed = self.scene_seed(index)
        image, label = render_scene(seed, self.size, style)
        meta = {
            "dataset": self.name,
            "index": index,
            "image_path": f"synthetic://{style}/{self.split}/{index}",
            "label_path": None,
            "ori_shape": self.size,
            "img_shape": self.size,
            "style": style,
            "scene_seed": seed,
        }
        return {"image": image, "label": label, "meta": meta}

    def __repr__(self) -> str:
        return (
            f"SyntheticDataset(num_images={self.num_images}, style={self.styles}, "
            f"size={self.size}, seed={self.seed}, split={self.split!r})"
        )
