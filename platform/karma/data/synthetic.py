"""The embedded default data set: an industrial/scientific supplies shop with real
semantic structure.

Items belong to categories with their own vocabularies and to brands that sell in 1-3
categories, so titles carry the signal. Users hold a few latent interests (a category
plus preferred brands); each sequence mostly stays within the current interest and
drifts to another with probability `drift` per step, and picks items by long-tail
popularity tilted toward the preferred brands. The next item is therefore predictable
from the history and from item text, better than from popularity alone. A
`cold_fraction` of items only ever occur as a user's LAST event, i.e. only as
leave-one-out test targets, where nothing but their text can place them.

Nothing is drawn per event in Python: users are generated in blocks of _BLOCK_USERS, each
block at once in NumPy (10M events take well under a minute). No user buys an item twice: a
first draw for every event stands unless an earlier event of the user holds that item, and
the rest are drawn again, per user in order, from their interest without the items held
before them, which is a sequential draw without repeats in law. Only the optional queries
and shown lists loop over the searches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .schema import DataError, InteractionData, validate

# name -> (product nouns, descriptors, uses for the free-text description)
CATEGORIES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "laboratory glassware": (
        ["beaker", "Erlenmeyer flask", "graduated cylinder", "volumetric flask", "test tube set",
         "petri dish", "glass funnel", "burette", "round-bottom flask", "watch glass"],
        ["borosilicate", "heavy-wall", "low-form", "250 ml", "500 ml", "1000 ml", "autoclavable",
         "with pour spout", "class A", "graduated"],
        ["chemistry labs", "titration and sample prep", "school science classes", "heating solutions"]),
    "soldering tools": (
        ["soldering iron", "solder wire", "desoldering pump", "soldering station", "flux pen",
         "tip cleaner", "hot air rework station", "solder wick", "helping hands stand"],
        ["lead-free", "temperature-controlled", "60/40 rosin core", "60W", "ESD-safe", "digital",
         "fine-tip", "fast-heating", "no-clean"],
        ["electronics repair", "PCB assembly", "through-hole and SMD work", "hobby electronics"]),
    "safety gloves": (
        ["nitrile gloves", "cut-resistant gloves", "latex gloves", "leather work gloves",
         "chemical-resistant gloves", "heat-resistant gloves", "vinyl exam gloves"],
        ["powder-free", "disposable", "size large", "box of 100", "heavy-duty", "textured grip",
         "food-safe", "ANSI A4", "extended cuff"],
        ["hand protection", "food handling", "mechanics and auto work", "handling chemicals"]),
    "3d printer filament": (
        ["PLA filament", "PETG filament", "ABS filament", "TPU flexible filament",
         "silk PLA filament", "carbon fibre nylon filament", "wood-fill PLA filament"],
        ["1.75mm", "2.85mm", "1 kg spool", "matte black", "translucent blue", "high-speed",
         "tangle-free", "dimensional accuracy +/- 0.02mm", "vacuum sealed"],
        ["FDM 3D printers", "printing functional parts", "prototyping and cosplay props"]),
    "3d printer parts": (
        ["hotend kit", "brass nozzle set", "PEI build plate", "extruder gear", "stepper motor",
         "heated bed", "Bowden tube", "thermistor", "mainboard"],
        ["0.4mm", "all-metal", "magnetic", "dual-drive", "NEMA 17", "24V", "hardened steel",
         "upgrade kit", "silent"],
        ["upgrading a 3D printer", "Ender and Prusa style printers", "replacing worn printer parts"]),
    "measuring instruments": (
        ["digital caliper", "outside micrometer", "dial indicator", "feeler gauge set",
         "machinist ruler", "height gauge", "thread pitch gauge", "tape measure"],
        ["stainless steel", "0-150 mm", "IP54", "large LCD", "inch/metric", "0.01 mm resolution",
         "hardened", "with case"],
        ["machining and inspection", "woodworking", "precise measurement"]),
    "abrasives": (
        ["sanding disc", "sanding roll", "flap wheel", "grinding wheel", "sandpaper sheets",
         "sanding belt", "polishing pad", "cut-off wheel"],
        ["80 grit", "120 grit", "220 grit", "aluminum oxide", "hook-and-loop", "5 inch",
         "wet/dry", "zirconia", "assorted grits"],
        ["sanding wood and metal", "surface finishing", "rust removal", "auto body work"]),
    "adhesives and tapes": (
        ["two-part epoxy", "super glue", "duct tape", "Kapton tape", "double-sided tape",
         "thread locker", "polyurethane glue", "masking tape", "hot melt glue sticks"],
        ["waterproof", "high-temperature", "industrial strength", "clear", "5-minute",
         "1 inch x 36 yards", "medium strength", "gap-filling"],
        ["bonding metal and plastic", "masking and sealing", "electronics insulation", "repairs"]),
    "fasteners": (
        ["hex bolts", "machine screws", "lock nuts", "flat washers", "pop rivets",
         "threaded inserts", "socket head cap screws", "wood screws", "spring pins"],
        ["M3", "M4", "M5", "stainless steel 304", "zinc-plated", "assortment kit", "metric",
         "black oxide", "100 pieces"],
        ["assembly and repair", "machine building", "furniture and DIY projects"]),
    "electrical connectors": (
        ["ring terminals", "butt connectors", "heat shrink tubing", "wire ferrules", "crimping tool",
         "spade connectors", "terminal blocks", "wire nuts", "solder seal connectors"],
        ["tinned copper", "22-10 AWG", "waterproof", "assorted", "insulated", "marine grade",
         "ratcheting", "3:1 shrink ratio"],
        ["automotive wiring", "marine electrical work", "panel building"]),
    "microscopes and optics": (
        ["compound microscope", "stereo microscope", "prepared microscope slides", "cover slips",
         "magnifying loupe", "microscope camera", "LED ring light", "blank slides"],
        ["40X-1000X", "LED illuminated", "binocular", "trinocular", "20X", "USB", "glass",
         "pre-cleaned"],
        ["biology students", "lab microscopy", "electronics inspection", "home science"]),
    "lab consumables": (
        ["pipette tips", "centrifuge tubes", "syringe filters", "sample vials", "weighing boats",
         "transfer pipettes", "cryogenic vials", "microcentrifuge tubes", "parafilm"],
        ["sterile", "1.5 ml", "50 ml", "polypropylene", "DNase-free", "graduated", "pack of 500",
         "0.22 um", "screw cap"],
        ["molecular biology", "sample storage", "liquid handling", "cell culture"]),
    "respiratory protection": (
        ["N95 respirator", "half-face respirator", "filter cartridges", "dust mask",
         "full-face respirator", "particulate filters", "organic vapor cartridges"],
        ["NIOSH approved", "reusable", "P100", "with exhalation valve", "medium size",
         "pack of 20", "low profile"],
        ["painting and spraying", "sanding dust", "chemical fumes", "woodworking shops"]),
    "pneumatics and fittings": (
        ["push-to-connect fitting", "pneumatic tubing", "quick coupler", "air pressure regulator",
         "ball valve", "solenoid valve", "air hose reel", "brass hose barb"],
        ["1/4 NPT", "polyurethane", "brass", "150 psi", "6 mm OD", "stainless", "12V DC",
         "industrial"],
        ["compressed air systems", "air tools", "automation projects"]),
    "power transmission": (
        ["ball bearing", "timing belt", "GT2 pulley", "linear rail", "shaft coupler",
         "lead screw", "pillow block bearing", "linear bearing"],
        ["608ZZ", "GT2", "8mm bore", "steel", "MGN12", "T8", "flexible", "sealed"],
        ["CNC machines", "robotics", "motion systems"]),
    "test and measurement": (
        ["digital multimeter", "clamp meter", "oscilloscope probe", "test leads",
         "non-contact voltage tester", "LCR meter", "bench power supply", "logic analyzer"],
        ["auto-ranging", "True RMS", "CAT III 600V", "100 MHz", "with alligator clips",
         "30V 5A", "handheld", "USB"],
        ["electrical troubleshooting", "electronics benches", "HVAC work"]),
}

_BRAND_HEADS = ["Acu", "Bor", "Cryo", "Dyna", "Ever", "Flux", "Gala", "Hexa", "Iso", "Kelvo",
                "Lumi", "Macro", "Nova", "Opti", "Prime", "Quanta", "Rexo", "Sigma", "Terra",
                "Ultra", "Vero", "Wolf", "Xeno", "Zeni"]
_BRAND_TAILS = ["Lab", "Tech", "Tools", "Pro", "Works", "Scientific", "Craft", "Line", "Max", "Forge"]
BRAND_BOOST = 12.0  # how much more a user likes an item from a preferred brand
# Users pick interest categories with probability ~ (category popularity mass) ** CATEGORY_SKEW;
# > 1 lets big categories draw more users, which keeps the head heavy although nobody
# buys the same item twice (without it the top items saturate and the tail flattens).
CATEGORY_SKEW = 1.5
_T0 = 1_672_531_200  # 2023-01-01 UTC: timestamps look like real unix times


@dataclass
class SyntheticConfig:
    n_users: int = 2000
    n_items: int = 800
    n_categories: int = 12
    n_brands: int = 40
    min_len: int = 6
    max_len: int = 30
    interests_per_user: tuple[int, int] = (1, 3)
    drift: float = 0.15
    cold_fraction: float = 0.05
    query_prob: float = 0.0
    zipf: float = 1.1
    seed: int = 0


_BLOCK_USERS = 1 << 16  # users generated together: bounds memory; each block has its own random stream


def _check(cfg: SyntheticConfig) -> None:
    lo, hi = cfg.interests_per_user
    problems = [
        (1 <= cfg.n_categories <= len(CATEGORIES), f"n_categories must be in [1, {len(CATEGORIES)}]"),
        (1 <= cfg.n_brands <= len(_BRAND_HEADS) * len(_BRAND_TAILS),
         f"n_brands must be in [1, {len(_BRAND_HEADS) * len(_BRAND_TAILS)}]"),
        (cfg.n_items >= 2 * cfg.n_categories, "n_items must be >= 2 * n_categories"),
        (cfg.n_users >= 1, "n_users must be >= 1"),
        (2 <= cfg.min_len <= cfg.max_len, "need 2 <= min_len <= max_len"),
        (1 <= lo <= hi <= cfg.n_categories, "interests_per_user must be (lo, hi) with 1 <= lo <= hi <= n_categories"),
        (0 <= cfg.drift <= 1 and 0 <= cfg.query_prob <= 1, "drift and query_prob must be in [0, 1]"),
        (0 <= cfg.cold_fraction < 0.5, "cold_fraction must be in [0, 0.5)"),
        (cfg.zipf >= 0, "zipf must be >= 0"),
    ]
    bad = [msg for ok, msg in problems if not ok]
    if bad:
        raise DataError(f"SyntheticConfig: {'; '.join(bad)} (got {cfg})")


def _padded(groups: list) -> tuple[np.ndarray, np.ndarray]:
    """Ragged integer groups as a [groups, longest] table padded with -1, and their lengths."""
    lengths = np.array([len(g) for g in groups])
    table = np.full((len(groups), max(1, int(lengths.max()))), -1, np.int64)
    for i, g in enumerate(groups):
        table[i, : len(g)] = g
    return table, lengths


def _items(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    """The catalogue, drawn for all items at once: per item a category, a brand selling in it,
    a product noun, two descriptors, a model number and a use for the description."""
    cats = list(CATEGORIES)[: cfg.n_categories]
    C, n = len(cats), cfg.n_items
    combos = np.array([h + t for h in _BRAND_HEADS for t in _BRAND_TAILS], dtype=object)
    brands = combos[rng.choice(len(combos), cfg.n_brands, replace=False)]
    # every category gets a brand (round robin), then brands add up to 2 more categories
    brand_cats = [{b % C} for b in range(cfg.n_brands)]
    for bc in brand_cats:
        bc.update(int(c) for c in rng.choice(C, rng.integers(0, 3), replace=False))
    cat_brands = [[b for b in range(cfg.n_brands) if c in brand_cats[b]] for c in range(C)]
    for c in range(C):  # with few brands a category may share a brand from another
        if not cat_brands[c]:
            cat_brands[c] = [int(rng.integers(cfg.n_brands))]

    share = rng.dirichlet(np.full(C, 8.0))
    cat = np.concatenate([np.arange(C), rng.choice(C, n - C, p=share)])
    rng.shuffle(cat)

    def pick(sizes: np.ndarray) -> np.ndarray:  # per item, a uniform index below sizes[its category]
        return (rng.random(n) * sizes[cat]).astype(np.int64)

    def word(k: int, ix: np.ndarray, capital: bool = False) -> np.ndarray:  # word ix of the category's list k
        lists = [CATEGORIES[c][k] for c in cats]
        start = np.cumsum([0] + [len(w) for w in lists])
        words = [w[:1].upper() + w[1:] if capital else w for w in sum(lists, [])]
        return np.array(words, dtype=object)[start[cat] + ix]

    sizes = [np.array([len(CATEGORIES[c][k]) for c in cats]) for k in range(3)]
    brand_table, brand_len = _padded(cat_brands)
    brand_of = brand_table[cat, pick(brand_len)]
    noun_ix, d1_ix, d2_ix, use_ix = pick(sizes[0]), pick(sizes[1]), pick(sizes[1] - 1), pick(sizes[2])
    d2_ix += d2_ix >= d1_ix  # a second, different descriptor
    noun, d1, d2, use = word(0, noun_ix), word(1, d1_ix), word(1, d2_ix), word(2, use_ix)
    model = (np.array([b[:2].upper() for b in brands], dtype=object)[brand_of] + "-"
             + rng.integers(100, 1000, n).astype(str).astype(object)
             + np.array(list("ABCDEFGHJKLMNPRSTX"), dtype=object)[rng.integers(18, size=n)])
    items = pd.DataFrame({
        "item_id": np.arange(1, n + 1),
        "title": brands[brand_of] + " " + d1 + " " + noun + " " + model,
        "category": np.array(cats, dtype=object)[cat],
        "brand": brands[brand_of],
        "text": word(0, noun_ix, capital=True) + ", " + d2 + ", for " + use + ".",
    })
    # Long tail: Zipf over a random popularity ranking of all items.
    pop = 1.0 / (rng.permutation(n) + 1.0) ** cfg.zipf
    cold = np.zeros(n, bool)
    cold[rng.choice(n, int(round(cfg.cold_fraction * n)), replace=False)] = True
    items["cold"] = cold  # extra column: cold items only appear as last events
    return items, dict(cat=cat, pop=pop, cold=cold, brand_of=brand_of, noun=noun, d1=d1, brands=brands, cats=cats)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """lo[0]..hi[0]-1, lo[1]..hi[1]-1, ... as one array."""
    size = hi - lo
    return np.arange(size.sum()) - np.repeat(np.cumsum(size) - size - lo, size)


class _Sampler:
    """Draws items for many events at once, each from its own distribution over a span of the
    items sorted by (category, brand): P(i) ~ w_i * (BRAND_BOOST if i's brand is one of the
    event's preferred brands), where w is popularity over warm items ("warm"), over all items
    ("all", a user's last event) or 1 per warm item ("flat", the fallback). A category is a
    contiguous span and each of its brands a block inside it, so the cumulative weight is
    piecewise linear in one global cumulative sum: a draw is a binary search, for any brands.

    `holes` (positions a user already holds, ascending, -1 padded) are taken out of the
    distribution exactly: every hole at or before the landing point moves it on by the hole's
    weight, so a draw never needs to be repeated."""

    def __init__(self, meta: dict, n_categories: int, n_brands: int):
        cat, brand, pop, cold = meta["cat"], meta["brand_of"], meta["pop"], meta["cold"]
        self.order = np.lexsort((brand, cat))  # position -> item row
        cs, bs = cat[self.order], brand[self.order]
        self.cat_lo = np.searchsorted(cs, np.arange(n_categories))
        self.cat_hi = np.searchsorted(cs, np.arange(n_categories), side="right")
        pair, grid = cs * n_brands + bs, np.arange(n_categories * n_brands)  # pair is sorted too
        self.pair_lo = np.searchsorted(pair, grid).reshape(n_categories, n_brands)
        self.pair_hi = np.searchsorted(pair, grid, side="right").reshape(n_categories, n_brands)
        warm = ~cold[self.order]
        weights = {"warm": pop[self.order] * warm, "all": pop[self.order], "flat": warm * 1.0}
        self.cum = {k: np.concatenate(([0.0], np.cumsum(w))) for k, w in weights.items()}
        self.count = {k: np.concatenate(([0], np.cumsum(w > 0))) for k, w in weights.items()}
        # the last position with weight at or before each one: a rounding error never lands on a weightless item
        self.last = {k: np.maximum.accumulate(np.where(w > 0, np.arange(len(w)), -1)) for k, w in weights.items()}

    def _draw(self, kind: str, lo, hi, blocks, u, holes) -> np.ndarray:
        """Positions in [lo, hi) (or -1 when nothing is left there), with weight times
        BRAND_BOOST inside the blocks [(a, b), ...] of each event."""
        cum, boost = self.cum[kind], BRAND_BOOST - 1.0
        rows = np.arange(len(lo))

        def mult(p):  # the weight multiplier at positions p (0 outside the span)
            m = ((p >= lo) & (p < hi)).astype(float)
            for a, b in blocks:
                m += boost * ((p >= a) & (p < b))
            return m

        def before(p):  # weight strictly before positions p, within the span
            q = np.clip(p, lo, hi)
            mass = cum[q] - cum[lo]
            for a, b in blocks:
                mass += boost * (cum[np.clip(q, a, b)] - cum[a])
            return mass

        left = self.count[kind][hi] - self.count[kind][lo]
        total = before(hi)
        hole_w = np.zeros((len(lo), holes.shape[1]))
        for k in range(holes.shape[1]):
            h = holes[:, k]
            hole_w[:, k] = np.where(h >= 0, (cum[h + 1] - cum[h]) * mult(h), 0.0)
            left -= hole_w[:, k] > 0
        x = u * np.maximum(total - hole_w.sum(axis=1), 0.0)
        for k in range(holes.shape[1]):  # holes in ascending order: each one passed shifts the target
            h = holes[:, k]
            x += np.where((h >= 0) & (before(h) <= x), hole_w[:, k], 0.0)
        x = np.minimum(x, np.nextafter(total, 0))  # never at the very end, however u rounds
        # the boundaries of the pieces of constant multiplier, and the piece x falls in
        edges = np.sort(np.stack([lo, hi] + [e for ab in blocks for e in ab], axis=1), axis=1)
        piece = np.minimum((before(edges[:, 1:].T).T <= x[:, None]).sum(axis=1), edges.shape[1] - 2)
        start, end = edges[rows, piece], edges[rows, piece + 1]
        target = cum[start] + (x - before(start)) / np.maximum(mult(start), 1.0)
        p = np.clip(np.searchsorted(cum, target, side="right") - 1, start, np.maximum(end - 1, start))
        p = self.last[kind][p]
        return np.where((left > 0) & (p >= lo), p, -1)

    def draw(self, c: np.ndarray, prefs: np.ndarray, warm_only: np.ndarray, u: np.ndarray,
             holes: np.ndarray | None = None) -> np.ndarray:
        """Positions for events in categories c with preferred brands prefs [events, 2] (-1:
        none); -1 where the category has nothing left to offer."""
        holes = np.full((len(c), 0), -1) if holes is None else holes
        out = np.empty(len(c), np.int64)
        for kind, m in (("warm", warm_only), ("all", ~warm_only)):
            cc, pp = c[m], np.maximum(prefs[m], 0)
            blocks = [(np.where(prefs[m, j] >= 0, self.pair_lo[cc, pp[:, j]], 0),
                       np.where(prefs[m, j] >= 0, self.pair_hi[cc, pp[:, j]], 0)) for j in range(prefs.shape[1])]
            out[m] = self._draw(kind, self.cat_lo[cc], self.cat_hi[cc], blocks, u[m], holes[m])
        return out

    def draw_warm(self, u: np.ndarray, holes: np.ndarray) -> np.ndarray:
        """Uniformly any warm position outside `holes`; -1 where none is left."""
        lo, hi = np.zeros(len(u), np.int64), np.full(len(u), len(self.order))
        return self._draw("flat", lo, hi, [], u, holes)


def _repeats(user: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Events whose item the same user already holds at an earlier position (events are in
    (user, position) order; -1 is no item)."""
    key = np.where(pos >= 0, user * (pos.max(initial=0) + 1) + pos, -1 - np.arange(len(pos)))
    order = np.argsort(key, kind="stable")  # stable: the earliest position of a repeat comes first
    dup = np.zeros(len(pos), bool)
    dup[order[1:]] = key[order[1:]] == key[order[:-1]]
    return dup


def _no_repeats(sampler: _Sampler, user: np.ndarray, pos: np.ndarray, c: np.ndarray, prefs: np.ndarray,
                warm_only: np.ndarray, rng: np.random.Generator) -> None:
    """Make every user's draws those of a sequential draw without repeats, in place. The
    first, independent draw of an event stands if no earlier event of its user holds that
    item (a rejection step that keeps the law exact); otherwise, and where the interest had
    nothing, the user's earliest such event is drawn again from its interest without the
    items held before it; if the interest is used up, from the unheld warm items uniformly;
    only if every warm item is held, from all of them (a repeat). Then the next event, and so
    on: each round handles one event per user, for all users at once."""
    starts = np.searchsorted(user, np.arange(user[-1] + 2))  # events of user v: starts[v]:starts[v + 1]
    repeat_ok = np.zeros(len(pos), bool)
    events = np.arange(len(pos))
    while len(events):
        bad = events[(_repeats(user[events], pos[events]) | (pos[events] < 0)) & ~repeat_ok[events]]
        if not len(bad):
            break
        now = bad[np.concatenate(([True], user[bad][1:] != user[bad][:-1]))]  # each user's earliest
        before = now - starts[user[now]]
        held = np.full((len(now), int(before.max())), -1)
        held[np.repeat(np.arange(len(now)), before), _ranges(np.zeros_like(before), before)] = \
            pos[_ranges(starts[user[now]], now)]
        held = np.sort(held, axis=1)  # ascending, as the sampler needs; the -1 padding is ignored
        drawn = sampler.draw(c[now], prefs[now], warm_only[now], rng.random(len(now)), held)
        gone = drawn < 0  # the interest is used up
        drawn[gone] = sampler.draw_warm(rng.random(int(gone.sum())), held[gone])
        full = drawn < 0  # every warm item held: a repeat it must be
        drawn[full] = sampler.draw_warm(rng.random(int(full.sum())), held[full][:, :0])
        pos[now], repeat_ok[now[full]] = drawn, True
        touched = np.zeros(user[-1] + 1, bool)
        touched[user[now]] = True
        events = events[touched[user[events]]]  # only these users can still hold repeats


def _block(cfg: SyntheticConfig, meta: dict, sampler: _Sampler, n_users: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sequences of `n_users` users, all drawn at once: (user 0..n_users-1, item row, ts)."""
    C = cfg.n_categories
    # lengths: min_len + a geometric extra with mean (max_len - min_len) / 8, capped at
    # max_len: mostly short sequences with a few long ones, as in real shops
    mean_extra = max((cfg.max_len - cfg.min_len) / 8, 1e-9)
    n = np.minimum(cfg.min_len + rng.geometric(1 / (1 + mean_extra), n_users) - 1, cfg.max_len)
    lo, hi = cfg.interests_per_user
    k = rng.integers(lo, hi + 1, n_users)
    # interests: k categories without replacement, weighted by cat_p (Gumbel top-k)
    gumbel = np.log(meta["cat_p"]) - np.log(-np.log(rng.random((n_users, C))))
    interests = np.argsort(-gumbel, axis=1)[:, :hi]
    # per interest a personal taste: 1-2 brands among those selling in the category, uniformly
    table, size = meta["cat_brand_table"], meta["cat_brand_len"]
    keys = np.where(table[interests] >= 0, rng.random((n_users, hi, table.shape[1])), 2.0)
    prefs = np.take_along_axis(table[interests], np.argsort(keys, axis=2)[:, :, :2], axis=2)
    if prefs.shape[2] == 1:
        prefs = np.concatenate([prefs, np.full_like(prefs, -1)], axis=2)
    n_pref = np.minimum(size[interests], rng.integers(1, 3, (n_users, hi)))
    prefs[:, :, 1] = np.where(n_pref >= 2, prefs[:, :, 1], -1)

    user = np.repeat(np.arange(n_users), n)
    start = np.cumsum(n) - n
    last = np.arange(len(user)) - start[user] == n[user] - 1
    # the current interest drifts to a different one with probability `drift` per step
    switch = (rng.random(len(user)) < cfg.drift) & (k[user] > 1)
    step = np.where(switch, 1 + (rng.random(len(user)) * np.maximum(k[user] - 1, 1)).astype(np.int64), 0)
    walked = np.cumsum(step)
    slot = (rng.integers(0, k)[user] + walked - (walked - step)[start][user]) % k[user]
    c = interests[user, slot]
    pref = prefs[user, slot]
    warm_only = ~last  # cold items only as a user's last event

    pos = sampler.draw(c, pref, warm_only, rng.random(len(user)))
    _no_repeats(sampler, user, pos, c, pref, warm_only, rng)
    ts = _T0 + rng.integers(0, 180 * 86400, n_users)[user]
    gaps = rng.integers(3600, 14 * 86400, len(user))
    cum = np.cumsum(gaps)
    return user, sampler.order[pos], ts + cum - (cum - gaps)[start][user]


def _queries(meta: dict, rows: np.ndarray, query_prob: float, rng: np.random.Generator) -> tuple[list, list]:
    """With probability query_prob per event a search: a query of a few of the clicked item's
    words, and 2-4 other popular warm items of its category that were shown. Loops over the
    searches in Python: queries are off by default."""
    cat, pop, cold = meta["cat"], meta["pop"], meta["cold"]
    options = np.stack([meta["noun"], meta["d1"] + " " + meta["noun"], meta["brands"][meta["brand_of"]] + " "
                        + meta["noun"], np.array(meta["cats"], dtype=object)[cat]], axis=1)
    searched = rng.random(len(rows)) < query_prob
    choice = rng.integers(0, 4, len(rows))
    queries = [None] * len(rows)
    shown = [None] * len(rows)
    warm_by_cat = [np.flatnonzero((cat == c) & ~cold) for c in range(cat.max() + 1)]
    for e in np.flatnonzero(searched):
        row = rows[e]
        queries[e] = options[row, choice[e]].lower()
        pool = warm_by_cat[cat[row]]
        pool = pool[pool != row]
        m = min(int(rng.integers(2, 5)), len(pool))
        shown[e] = rng.choice(pool, m, replace=False, p=pop[pool] / pop[pool].sum()) + 1 if m else None
    return queries, shown


def generate(cfg: SyntheticConfig | None = None) -> InteractionData:
    """Generate the synthetic data set (deterministic given cfg.seed)."""
    cfg = cfg or SyntheticConfig()
    _check(cfg)
    items_seed, events_seed, query_seed = np.random.SeedSequence(cfg.seed).spawn(3)
    items, meta = _items(cfg, np.random.default_rng(items_seed))
    cat, pop, cold, brand_of = meta["cat"], meta["pop"], meta["cold"], meta["brand_of"]
    by_cat = [np.flatnonzero(cat == c) for c in range(cfg.n_categories)]
    mass = np.array([pop[ix[~cold[ix]]].sum() for ix in by_cat]) ** CATEGORY_SKEW
    meta["cat_p"] = mass / mass.sum()  # popular categories attract more users
    meta["cat_brand_table"], meta["cat_brand_len"] = _padded([np.unique(brand_of[ix]) for ix in by_cat])
    sampler = _Sampler(meta, cfg.n_categories, cfg.n_brands)

    users, rows, times = [], [], []
    blocks = range(0, cfg.n_users, _BLOCK_USERS)
    for first, seed in zip(blocks, events_seed.spawn(len(blocks))):
        user, row, ts = _block(cfg, meta, sampler, min(_BLOCK_USERS, cfg.n_users - first),
                               np.random.default_rng(seed))
        users.append(user + first + 1)
        rows.append(row)
        times.append(ts)
    rows = np.concatenate(rows)
    events = pd.DataFrame({"user_id": np.concatenate(users), "item_id": rows + 1, "ts": np.concatenate(times)})
    if cfg.query_prob > 0:
        events["query"], events["shown"] = _queries(meta, rows, cfg.query_prob, np.random.default_rng(query_seed))
    return validate(InteractionData(items=items, events=events, name="synthetic"), "synthetic")
