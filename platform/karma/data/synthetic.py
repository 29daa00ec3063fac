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


def _items(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    cats = list(CATEGORIES)[: cfg.n_categories]
    C = len(cats)
    combos = [h + t for h in _BRAND_HEADS for t in _BRAND_TAILS]
    brands = [combos[i] for i in rng.choice(len(combos), cfg.n_brands, replace=False)]
    # every category gets a brand (round robin), then brands add up to 2 more categories
    brand_cats = [{b % C} for b in range(cfg.n_brands)]
    for bc in brand_cats:
        for c in rng.choice(C, rng.integers(0, 3), replace=False):
            bc.add(int(c))
    cat_brands = [[b for b in range(cfg.n_brands) if c in brand_cats[b]] for c in range(C)]
    for c in range(C):  # with few brands a category may share a brand from another
        if not cat_brands[c]:
            cat_brands[c] = [int(rng.integers(cfg.n_brands))]

    share = rng.dirichlet(np.full(C, 8.0))
    cat = np.concatenate([np.arange(C), rng.choice(C, cfg.n_items - C, p=share)])
    rng.shuffle(cat)
    rows, attrs = [], []
    for i, c in enumerate(cat.tolist()):
        nouns, descs, uses = CATEGORIES[cats[c]]
        b = cat_brands[c][rng.integers(len(cat_brands[c]))]
        noun = nouns[rng.integers(len(nouns))]
        d1, d2 = (descs[j] for j in rng.choice(len(descs), 2, replace=False))
        model = f"{brands[b][:2].upper()}-{rng.integers(100, 1000)}{'ABCDEFGHJKLMNPRSTX'[rng.integers(18)]}"
        rows.append((i + 1, f"{brands[b]} {d1} {noun} {model}", cats[c], brands[b],
                     f"{noun[0].upper() + noun[1:]}, {d2}, for {uses[rng.integers(len(uses))]}."))
        attrs.append((b, noun, d1))
    items = pd.DataFrame(rows, columns=["item_id", "title", "category", "brand", "text"])
    # Long tail: Zipf over a random popularity ranking of all items.
    pop = 1.0 / (rng.permutation(cfg.n_items) + 1.0) ** cfg.zipf
    n_cold = int(round(cfg.cold_fraction * cfg.n_items))
    cold = np.zeros(cfg.n_items, bool)
    cold[rng.choice(cfg.n_items, n_cold, replace=False)] = True
    items["cold"] = cold  # extra column: cold items only appear as last events
    brand_of = np.array([a[0] for a in attrs])
    return items, dict(cat=cat, pop=pop, cold=cold, brand_of=brand_of, attrs=attrs, brands=brands, cats=cats)


def _draw(w: np.ndarray, u: float) -> int:
    """Index drawn with weights w using the uniform u (cheaper than rng.choice); -1 if all are 0."""
    c = np.cumsum(w)
    if c[-1] <= 0:
        return -1
    return int(min(np.searchsorted(c, u * c[-1], side="right"), len(c) - 1))


def _query(rng: np.random.Generator, meta: dict, row: int) -> str:
    b, noun, d1 = meta["attrs"][row]
    options = [noun, f"{d1} {noun}", f"{meta['brands'][b]} {noun}", meta["cats"][meta["cat"][row]]]
    return options[rng.integers(len(options))].lower()


def generate(cfg: SyntheticConfig | None = None) -> InteractionData:
    """Generate the synthetic data set (deterministic given cfg.seed)."""
    cfg = cfg or SyntheticConfig()
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    items, meta = _items(cfg, rng)
    cat, pop, cold, brand_of = meta["cat"], meta["pop"], meta["cold"], meta["brand_of"]
    C = cfg.n_categories
    by_cat = [np.flatnonzero(cat == c) for c in range(C)]
    warm_by_cat = [ix[~cold[ix]] for ix in by_cat]
    brands_in_cat = [np.unique(brand_of[ix]) for ix in by_cat]
    mass = np.array([pop[ix].sum() for ix in warm_by_cat]) ** CATEGORY_SKEW
    cat_p = mass / mass.sum()  # popular categories attract more users
    all_warm = np.flatnonzero(~cold)
    item_ids = items["item_id"].to_numpy()

    # lengths: min_len + a geometric extra with mean (max_len - min_len) / 8, capped at
    # max_len: mostly short sequences with a few long ones, as in real shops
    mean_extra = max((cfg.max_len - cfg.min_len) / 8, 1e-9)
    lo, hi = cfg.interests_per_user
    users, seqs, times, queries, showns = [], [], [], [], []
    for u in range(cfg.n_users):
        n = int(min(cfg.min_len + rng.geometric(1 / (1 + mean_extra)) - 1, cfg.max_len))
        k = int(rng.integers(lo, hi + 1))
        interests = rng.choice(C, k, replace=False, p=cat_p)
        weights = []  # per interest: (items incl. cold, weights) with preferred brands boosted
        for c in interests.tolist():
            ix = by_cat[c]
            cb = brands_in_cat[c]  # a personal taste: any brand selling in the category
            pref = rng.choice(cb, min(len(cb), int(rng.integers(1, 3))), replace=False)
            weights.append((ix, pop[ix] * np.where(np.isin(brand_of[ix], pref), BRAND_BOOST, 1.0)))
        used = np.zeros(cfg.n_items, bool)
        cur = int(rng.integers(k))
        switch, draws = rng.random(n), rng.random(n)
        seq = []
        for t in range(n):
            if k > 1 and switch[t] < cfg.drift:
                cur = (cur + 1 + int(rng.integers(k - 1))) % k  # a different interest
            ix, w = weights[cur]
            allowed = ~used[ix] & (~cold[ix] if t < n - 1 else True)  # cold only as the last event
            j = _draw(w * allowed, draws[t])
            if j >= 0:
                row = int(ix[j])
            else:  # interest exhausted: any unused warm item (any warm item if none is left)
                free = all_warm[~used[all_warm]]
                free = free if len(free) else all_warm
                row = int(free[int(draws[t] * len(free))])
            used[row] = True
            seq.append(row)
        users.append(np.full(n, u + 1))
        seqs.append(seq)
        times.append(_T0 + int(rng.integers(0, 180 * 86400)) + np.cumsum(rng.integers(3600, 14 * 86400, n)))
        if cfg.query_prob > 0:
            for row in seq:
                if rng.random() < cfg.query_prob:  # a search: the query and its other results
                    queries.append(_query(rng, meta, row))
                    pool = warm_by_cat[cat[row]]
                    pool = pool[pool != row]
                    m = min(int(rng.integers(2, 5)), len(pool))
                    p = pop[pool] / pop[pool].sum() if len(pool) else None
                    showns.append(item_ids[rng.choice(pool, m, replace=False, p=p)] if m else None)
                else:
                    queries.append(None)
                    showns.append(None)

    rows = np.concatenate([np.asarray(s, np.int64) for s in seqs])
    events = pd.DataFrame({"user_id": np.concatenate(users).astype(np.int64),
                           "item_id": item_ids[rows], "ts": np.concatenate(times).astype(np.int64)})
    if cfg.query_prob > 0:
        events["query"] = pd.Series(queries, dtype=object)
        events["shown"] = pd.Series(showns, dtype=object)
    return validate(InteractionData(items=items, events=events, name="synthetic"), "synthetic")
