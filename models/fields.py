"""The field policy: which explicit fields the model may learn from, and in what bounded form. No I/O.

A CRM's ``lead_created`` carries e-mail addresses, names, phone numbers, company names. Left as they
are, every string value would become a one-hot weight name: personal data living on in every
checkpoint, and a model that grows with every lead. The policy (``[fields]`` in the scoring config,
see ``models/scoring.toml``) gives each explicit field one kind:

- ``categorical``: a bounded vocabulary, either fixed (``values = [...]``) or learned by the trainer
  (the ``top`` N values seen in at least ``min_count`` closed deals); any other value is ``other``.
- ``numeric``: the number itself (a string that is not a number is left out).
- ``boolean``: ``true`` / ``false``.
- ``private``: never a feature. Kept in the lead's state for people; never in a snapshot, a
  training message, a checkpoint or a report.

Fields the config does not declare: a name that looks like an identifier (``email``, ``name``,
``phone``, ``company``, ``*_email``, ``*_name`` ...) is private; a string value that looks like an
e-mail address is left out; other values are hashed, with their field name, into ``hash_buckets``
shared buckets (numbers by their field name alone). So whatever comes in, the model sees at most
``hash_buckets`` one-hot plus ``hash_buckets`` numeric keys for undeclared fields, plus those of
the declared ones, plus the fixed behavioural features: a bounded feature space.

>>> policy = parse_policy({"declared": {"industry": {"kind": "categorical", "values": ["software"]},
...                                     "age": "numeric", "email": "private"}})
>>> enc = Encoder(policy)
>>> x, labels = enc.encode({"f_industry": "retail", "f_age": 31.0, "f_email": "a@b.c", "f_work_phone": "0151",
...                         "f_city": "berlin", "stage": "new"})
>>> sorted(x)
['f_age', 'f_industry=other', 'h=211', 'stage=new']
>>> labels["h=211"]
'f_city=berlin'
>>> public({"f_email": "a@b.c", "f_phone": "0151", "f_city": "berlin", "n_visit": 2.0}, policy)
{'f_city': 'berlin', 'n_visit': 2.0}
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from operator import itemgetter
from dataclasses import dataclass, field
from typing import Any

KINDS = ("categorical", "numeric", "boolean", "private")
DEFAULT_HASH_BUCKETS = 1024
DEFAULT_TOP = 50
DEFAULT_MIN_COUNT = 3
OTHER = "other"
# Undeclared fields with these names (after lower-casing, non-alphanumerics as "_") are private:
# they name a person, reach them, or identify their company.
IDENTIFIER_NAMES = frozenset({
    "email", "e_mail", "mail", "email_address", "name", "first_name", "last_name", "full_name", "firstname",
    "lastname", "surname", "given_name", "family_name", "middle_name", "contact", "contact_person", "person",
    "phone", "phone_number", "mobile", "mobile_phone", "cell", "telephone", "tel", "fax", "whatsapp",
    "company", "company_name", "organisation", "organization", "org", "employer", "account", "account_name",
    "address", "street", "street_address", "address_line_1", "address_line_2", "zip", "zip_code", "postcode",
    "postal_code", "ip", "ip_address", "birthday", "birth_date", "date_of_birth", "dob", "ssn",
    "social_security_number", "tax_id", "vat_id", "iban", "bic", "credit_card", "passport", "national_id",
    "username", "user_name", "login", "password", "user_id", "customer_id", "crm_id", "external_id",
    "website", "url", "homepage", "domain", "linkedin", "linkedin_url", "twitter", "facebook", "instagram",
    "notes", "note", "comment", "comments", "description", "message",
})
# ... and so are undeclared fields whose name ends with one of these (``work_email``, ``company_name``).
IDENTIFIER_SUFFIXES = ("_email", "_mail", "_name", "_phone", "_mobile", "_fax", "_address", "_street", "_zip",
                       "_postcode", "_ip", "_iban", "_url", "_website", "_linkedin", "_contact", "_notes")
# ... unless the name is a flag about the identifier (``do_not_email``, ``has_phone``), not the identifier.
FLAG_PREFIXES = ("do_not_", "dont_", "no_", "has_", "is_", "opt_in_", "opt_out_", "allow_", "consent_", "accepts_",
                 "valid_", "verified_", "bounced_", "n_", "num_", "count_")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_BOOLEANS = {"true": "true", "yes": "true", "1": "true", "false": "false", "no": "false", "0": "false"}
# Internal string features with a domain fixed by the code (stage names, months, weekdays).
_INTERNAL_CATEGORIES = {"stage", "created_month", "created_weekday"}


class PolicyError(ValueError):
    """The ``[fields]`` table of the scoring config has a key of the wrong form."""


@dataclass(frozen=True)
class FieldSpec:
    kind: str
    values: frozenset[str] | None = None  # categorical: a fixed vocabulary (lower-cased)
    top: int = DEFAULT_TOP  # categorical without values: how many learned values are kept
    min_count: int = DEFAULT_MIN_COUNT  # ... each seen in at least this many closed deals


@dataclass(frozen=True)
class FieldPolicy:
    declared: dict[str, FieldSpec] = field(default_factory=dict)
    hash_buckets: int = DEFAULT_HASH_BUCKETS
    private_names: frozenset[str] = frozenset()  # extra names private by default
    # name -> is_private: the same few field names come with every event (not part of equality)
    _known: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def is_private(self, name: str) -> bool:
        """Whether field ``name`` must never become a feature.

        >>> p = FieldPolicy()
        >>> [p.is_private(n) for n in ("Email", "work_email", "company_size", "city", "Company Name", "do_not_email")]
        [True, True, False, False, True, False]
        """
        known = self._known.get(name)
        if known is None:
            known = self._known[name] = self._is_private(name)
        return known

    def _is_private(self, name: str) -> bool:
        spec = self.declared.get(name)
        if spec is not None:
            return spec.kind == "private"
        norm = normalise(name)
        if norm in IDENTIFIER_NAMES or norm in self.private_names:
            return True
        return norm.endswith(IDENTIFIER_SUFFIXES) and not norm.startswith(FLAG_PREFIXES)

    def with_private(self, names: list[str]) -> FieldPolicy:
        """This policy with ``names`` declared private (e.g. columns an import mapping marks private)."""
        declared = dict(self.declared) | {n: FieldSpec("private") for n in names}
        return FieldPolicy(declared, self.hash_buckets, self.private_names)


def normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def public(f: dict[str, Any], policy: FieldPolicy) -> dict[str, Any]:
    """``f`` without its private fields' features (``f_<name>``): what may be stored and learned."""
    private = [k for k in f if k.startswith("f_") and policy.is_private(k[2:])]
    if not private:
        return f
    return {k: v for k, v in f.items() if k not in private}


_HASHED: dict[tuple[int, str, str], str | None] = {}  # the same values come back with every event


def _hashed_value(buckets: int, name: str, value: str) -> str | None:
    """The one-hot key of an undeclared string field's value, or None for an e-mail address.
    Memoised in this process only (never pickled: a checkpoint holds no value)."""
    cache_key = (buckets, name, value)
    if cache_key in _HASHED:
        return _HASHED[cache_key]
    if len(_HASHED) > 100_000:
        _HASHED.clear()
    hashed = None if _EMAIL.search(value) else f"h={_bucket(f'{name}={value}', buckets)}"
    _HASHED[cache_key] = hashed
    return hashed


def _bucket(text: str, buckets: int) -> str:
    return format(zlib.crc32(text.encode()) % buckets, "x")


@lru_cache(maxsize=10_000)  # an undeclared numeric field's key: its name alone decides it, on every event
def _numeric_bucket(name: str, buckets: int) -> str:
    return f"h_{_bucket(name, buckets)}"


@dataclass
class TopValues:
    """A bounded counter (Space-Saving): at most ``capacity`` values, the most frequent kept.

    >>> t = TopValues(capacity=3)
    >>> for v in ["a", "a", "a", "b", "b", "c", "d", "e"]:
    ...     _ = t.add(v)
    >>> t.top(2, min_count=2)
    ['a', 'e']
    >>> len(t.counts) <= 3
    True
    """

    capacity: int
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, value: str) -> str | None:
        """Count ``value``; returns the value evicted to make room, if any."""
        if value in self.counts or len(self.counts) < self.capacity:
            self.counts[value] = self.counts.get(value, 0) + 1
            return None
        # Full: the least frequent value makes room, and the newcomer inherits its count (+1), which
        # over-estimates it; a value that keeps coming back climbs, one-offs keep replacing each other.
        evicted = min(self.counts.items(), key=itemgetter(1))[0]  # the oldest of the least frequent
        self.counts[value] = self.counts.pop(evicted) + 1
        return evicted

    def top(self, n: int, min_count: int) -> list[str]:
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [v for v, c in ranked[:n] if c >= min_count]


@dataclass
class Encoder:
    """The policy plus the learned vocabularies: turns features into the model's bounded inputs.

    Lives in the trainer (which learns the vocabularies from closed deals) and is copied into
    every serving checkpoint, so the stream and ``leadstream evaluate`` encode identically.
    """

    policy: FieldPolicy = field(default_factory=FieldPolicy)
    counters: dict[str, TopValues] = field(default_factory=dict)
    vocab: dict[str, frozenset[str]] = field(default_factory=dict)

    def encode(self, f: dict[str, Any]) -> tuple[dict[str, float | str], dict[str, str]]:
        """``(features, labels)``: features as the model sees them (strings become one-hot keys
        ``name=value``; numbers stay numbers), and the readable name of each hashed key."""
        out: dict[str, float | str] = {}
        labels: dict[str, str] = {}
        for k, v in f.items():
            if k.startswith("f_"):
                self.encode_field(out, labels, k, v)
            elif isinstance(v, str):
                self.encode_category(out, labels, k, v)
            else:
                out[k] = v
        return out, labels

    def encode_category(self, out: dict[str, Any], labels: dict[str, str], k: str, v: str) -> None:
        """Add a derived categorical feature (``stage``, ``created_month``...) as its one-hot key."""
        if k in _INTERNAL_CATEGORIES:
            out[_one_hot_key(k, v)] = 1.0
        else:  # not expected; kept bounded
            key = f"h={_bucket(f'{k}={v}', self.policy.hash_buckets)}"
            out[key], labels[key] = 1.0, f"{k}={v}"

    def encode_field(self, out: dict[str, Any], labels: dict[str, str], k: str, v: Any) -> None:
        """Add one explicit field's feature ``k`` (``f_<name>``) to ``out`` as the model sees it.

        A string value is encoded once and remembered (a lead's fields come back with each of its
        events) until the vocabularies change; numbers are not (a hashed one adds to its bucket).
        """
        if v.__class__ is not str:
            self._encode_field(out, labels, k, v)
            return
        memo = self.__dict__.setdefault("_memo", {})
        encoded = memo.get((k, v))
        if encoded is None:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            one: dict[str, Any] = {}
            label: dict[str, str] = {}
            self._encode_field(one, label, k, v)
            encoded = memo[k, v] = (one, label)
        out.update(encoded[0])
        if encoded[1]:
            labels.update(encoded[1])

    def _encode_field(self, out: dict[str, Any], labels: dict[str, str], k: str, v: Any) -> None:
        name = k[2:]
        spec = self.policy.declared.get(name)
        if spec is not None:
            self._declared(out, k, name, spec, v)
        elif not self.policy.is_private(name):
            buckets = self.policy.hash_buckets
            if isinstance(v, str):
                hashed = _hashed_value(buckets, name, v)
                if hashed is not None:  # None: an e-mail address in a field of any other name: never a feature
                    out[hashed], labels[hashed] = 1.0, f"{k}={v}"
            else:
                key = _numeric_bucket(name, buckets)
                out[key] = out.get(key, 0.0) + float(v)
                labels[key] = k

    def _declared(self, out: dict[str, float | str], k: str, name: str, spec: FieldSpec, v: Any) -> None:
        if spec.kind == "numeric":
            number = _number(v)
            if number is not None:
                out[k] = number
        elif spec.kind == "boolean":
            flag = _BOOLEANS.get(str(v).strip().lower()) if not isinstance(v, float) else str(v != 0).lower()
            if flag is not None:
                out[f"{k}={flag}"] = 1.0
        elif spec.kind == "categorical":
            value = str(v).strip().lower()
            known = spec.values if spec.values is not None else self.vocab.get(name, frozenset())
            out[f"{k}={value if value in known else OTHER}"] = 1.0

    def learn(self, f: dict[str, Any]) -> None:
        """Count one closed deal's values of the learned categorical fields (bounded counters)."""
        for name, spec in self.policy.declared.items():
            if spec.kind != "categorical" or spec.values is not None or f"f_{name}" not in f:
                continue
            counter = self.counters.setdefault(name, TopValues(capacity=max(4 * spec.top, 64)))
            value = str(f[f"f_{name}"]).strip().lower()
            evicted = counter.add(value)
            vocab = self.vocab.get(name, frozenset())
            # Membership can only change if the counted value is not in it yet, or a member left.
            if (value not in vocab and counter.counts[value] >= spec.min_count) or evicted in vocab:
                self.vocab[name] = frozenset(counter.top(spec.top, spec.min_count))
                self.forget_encodings()

    def forget_encodings(self) -> None:
        """Drop what the encoder remembers of its encodings (made with vocabularies that changed)."""
        for name in ENCODER_MEMOS:
            self.__dict__.pop(name, None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ENCODER_MEMOS:  # never in a checkpoint
            state.pop(name, None)
        return state


_MEMO_SIZE = 20_000  # distinct (field, string value) encodings an encoder remembers
# An encoder's memos, in its __dict__: its (field, string value) encodings (``_memo``) and its leads'
# explicit inputs (``_lead_inputs``, models.learner.model_inputs).
ENCODER_MEMOS = ("_memo", "_lead_inputs")


@lru_cache(maxsize=10_000)  # (stage, proposal) -> "stage=proposal": a handful of values
def _one_hot_key(k: str, v: str) -> str:
    return f"{k}={v}"


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v))
    except ValueError:
        return None


def parse_policy(cfg: Any) -> FieldPolicy:
    """The policy from the ``[fields]`` table of the scoring config (already parsed TOML).

    >>> parse_policy({"declared": {"age": "number"}})
    Traceback (most recent call last):
    ...
    models.fields.PolicyError: scoring config [fields.declared].age = 'number': expected one of \
categorical, numeric, boolean, private, or { kind = "categorical", values = [...] | top = N, min_count = K }
    """
    if not isinstance(cfg, dict):
        raise PolicyError(f"scoring config [fields] = {cfg!r}: expected a table")
    unknown = set(cfg) - {"hash_buckets", "private", "declared"}
    if unknown:
        raise PolicyError(f"scoring config [fields].{sorted(unknown)[0]}: unknown key; expected hash_buckets, "
                          "private or [fields.declared]")
    buckets = cfg.get("hash_buckets", DEFAULT_HASH_BUCKETS)
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 16 <= buckets <= 65536:
        raise PolicyError(f"scoring config [fields].hash_buckets = {buckets!r}: expected a whole number in 16..65536")
    private = cfg.get("private", [])
    if not isinstance(private, list) or not all(isinstance(n, str) and n.strip() for n in private):
        raise PolicyError(f"scoring config [fields].private = {private!r}: expected a list of field names")
    declared_cfg = cfg.get("declared", {})
    if not isinstance(declared_cfg, dict):
        raise PolicyError(f"scoring config [fields.declared] = {declared_cfg!r}: expected a table of field = kind")
    declared = {name: _spec(name, raw) for name, raw in declared_cfg.items()}
    return FieldPolicy(declared, buckets, frozenset(normalise(n) for n in private))


def _spec(name: str, raw: Any) -> FieldSpec:
    form = ('one of categorical, numeric, boolean, private, '
            'or { kind = "categorical", values = [...] | top = N, min_count = K }')
    if isinstance(raw, str):
        if raw not in KINDS:
            raise PolicyError(f"scoring config [fields.declared].{name} = {raw!r}: expected {form}")
        return FieldSpec(raw)
    if not isinstance(raw, dict) or raw.get("kind") not in KINDS or set(raw) - {"kind", "values", "top", "min_count"}:
        raise PolicyError(f"scoring config [fields.declared].{name} = {raw!r}: expected {form}")
    if raw["kind"] != "categorical" and set(raw) != {"kind"}:
        raise PolicyError(f"scoring config [fields.declared].{name}: values, top and min_count are for "
                          f"kind = \"categorical\" only")
    values = raw.get("values")
    if values is not None and (not isinstance(values, list) or not all(isinstance(v, str) for v in values)):
        raise PolicyError(f"scoring config [fields.declared].{name}.values = {values!r}: expected a list of strings")
    for key, default in (("top", DEFAULT_TOP), ("min_count", DEFAULT_MIN_COUNT)):
        n = raw.get(key, default)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
            raise PolicyError(f"scoring config [fields.declared].{name}.{key} = {n!r}: expected a whole number in 1..1000")
    return FieldSpec(raw["kind"], None if values is None else frozenset(v.strip().lower() for v in values),
                     raw.get("top", DEFAULT_TOP), raw.get("min_count", DEFAULT_MIN_COUNT))
