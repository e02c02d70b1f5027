"""
The readers and writers of every stage file's format (names in gelutrace.files.layout): prompt CSVs, the
graph's attributes, edge list and metadata, activation matrices and lists, neuron columns, top examples and
subsets. Every write is atomic (gelutrace.files.atomic); nothing here needs pickle to read a file back.
"""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from gelutrace import PipelineError
from gelutrace.files.atomic import atomic_open, write_csv, write_json, write_npz
from gelutrace.files.layout import (
    ACTIVATIONS_JSON,
    ACTIVATIONS_PICKLE,
    ATTRIBUTE_COLUMNS,
    ATTRIBUTES,
    DATASET,
    EDGES,
    FREQUENCY_COLUMNS,
    GRAPH_META,
    HALVES,
    PROMPT_COLUMNS,
    TOP_EXAMPLES_COLUMNS,
    path,
)
from gelutrace.model.generation import Prompt


def write_top_examples(target, values: np.ndarray, sample_ids: np.ndarray, text: dict):
    """
    {m}_neuron_top_examples.csv (TOP_EXAMPLES_COLUMNS) from the (k', N) top values and sample ids in rank order
    and each sample's (context, token) texts: every neuron in id order, rank 0 first. Each sample's two text
    fields are quoted once (as pandas and the csv module quote) and the lines joined: several times faster than
    a CSV writer over the hundreds of thousands of rows. Floats are written as their round-trip repr.
    """
    quoted = {}
    for s, fields in text.items():
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\r\n").writerow(fields)  # fields holding \r or \n are quoted
        quoted[s] = buf.getvalue()[:-2]
    k, n = np.shape(sample_ids)
    columns = (np.repeat(np.arange(n), k).tolist(), np.tile(np.arange(k), n).tolist(),
               np.asarray(values, np.float64).T.ravel().tolist(), np.asarray(sample_ids).T.ravel().tolist())
    with atomic_open(target, "w", newline="", encoding="utf-8") as f:
        f.write(",".join(TOP_EXAMPLES_COLUMNS) + "\n")
        f.writelines(f"{a},{b},{v!r},{s},{quoted[s]}\n" for a, b, v, s in zip(*columns))


def frequency_table(counts: np.ndarray, value_sum: np.ndarray, samples: int, d_mlp: int,
                    attribution: np.ndarray | None = None, attribution_halves: np.ndarray | None = None) -> pd.DataFrame:
    """{m}_neuron_frequency.csv's rows, every neuron in id order; attribution (and its (2, N) halves) is empty when
    not computed."""
    ids = np.arange(len(counts))
    empty = np.full(len(ids), np.nan)
    halves = {f"attribution_{h}": empty if attribution_halves is None else attribution_halves[i]
              for i, h in enumerate(HALVES)}
    return pd.DataFrame({
        "neuron_id": ids, "activation_count": counts,
        "activation_frequency": counts / samples if samples else np.zeros(len(ids)),
        "layer": ids // d_mlp, "dimension": ids % d_mlp,
        "mean_activation": value_sum / samples if samples else np.zeros(len(ids)),
        "attribution": empty if attribution is None else attribution, **halves,
    }, columns=FREQUENCY_COLUMNS)


# --- prompt CSV -------------------------------------------------------------------------------------------
MAX_PER_PROMPT = 1_000_000  # new tokens or samples of one prompt: beyond this a CSV is a typo, not a plan


def _check_field_counts(p: Path):
    """Every row has as many fields as the header (pandas would silently shift a longer row into its index)."""
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            for row in reader:
                if row and len(row) != len(header):
                    raise PipelineError(f"{p} line {reader.line_num}: {len(row)} fields, but the header has "
                                        f"{len(header)} ({', '.join(header)}); quote prompts that hold commas")
    except (UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"cannot parse prompt CSV {p}: {e}") from None


def read_prompts(csv_path) -> list[Prompt]:
    """The prompts of a prompt CSV, validated: one PipelineError naming the first problem."""
    p = Path(csv_path)
    if not p.is_file():
        raise PipelineError(f"prompt CSV {p} does not exist")
    _check_field_counts(p)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8")
    except Exception as e:
        raise PipelineError(f"cannot parse prompt CSV {p}: {e}") from None
    missing = [c for c in PROMPT_COLUMNS[:2] if c not in df.columns]
    if missing:
        raise PipelineError(f"prompt CSV {p} lacks column(s) {', '.join(missing)} "
                            f"(needs {', '.join(PROMPT_COLUMNS)}; num_samples is optional)")
    if len(df) == 0:
        raise PipelineError(f"prompt CSV {p} has no prompts")
    prompts = []
    for i, row in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        text = row["prompts"]
        if not text.strip():
            raise PipelineError(f"{p} line {i}: empty prompt")
        counts = {}
        for col, default in (("number_of_new_tokens", None), ("num_samples", "1")):
            raw = str(row.get(col, "") or default or "").strip()
            try:
                value = int(raw)
            except ValueError:
                raise PipelineError(f"{p} line {i}: {col} must be a non-negative integer, got {raw!r}") from None
            if value > MAX_PER_PROMPT:
                raise PipelineError(f"{p} line {i}: {col} = {value} is more than {MAX_PER_PROMPT:,} per prompt")
            if value < 0 or (col == "num_samples" and value == 0):
                raise PipelineError(f"{p} line {i}: {col} must be {'positive' if col == 'num_samples' else 'non-negative'}, got {value}")
            counts[col] = value
        prompts.append(Prompt(text, counts["number_of_new_tokens"], counts["num_samples"]))
    if not any(q.new_tokens for q in prompts):
        raise PipelineError(f"prompt CSV {p}: every prompt asks for 0 new tokens, so there is nothing to generate")
    return prompts


# --- stage a: neurons, edges, graph metadata -------------------------------------------------------------
def neuron_attributes(n_layer: int, d_mlp: int) -> pd.DataFrame:
    ids = np.arange(n_layer * d_mlp, dtype=np.int64)
    return pd.DataFrame({"node_id": ids, "layer": ids // d_mlp, "dimension": ids % d_mlp})


def read_attributes(directory, m: str) -> pd.DataFrame:
    p = path(directory, ATTRIBUTES, m)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage a or b writes it)")
    df = pd.read_csv(p)
    if list(df.columns[:3]) != ATTRIBUTE_COLUMNS:
        raise PipelineError(f"{p}: expected columns {', '.join(ATTRIBUTE_COLUMNS)}")
    return df


def canonical_edges_size(n_layer: int, d_mlp: int) -> int:
    """Bytes of the canonical .el: every neuron of layer i to every neuron of layer i+1, 'src tgt\\n'."""
    ids = np.arange(n_layer * d_mlp)
    digits = np.char.str_len(ids.astype(str)) if len(ids) else np.zeros(0, int)
    per_layer = digits.reshape(n_layer, d_mlp).sum(axis=1)
    # each src of layer i appears d_mlp times, each tgt of layer i+1 appears d_mlp times
    return int(sum(d_mlp * (per_layer[i] + per_layer[i + 1]) + 2 * d_mlp * d_mlp for i in range(n_layer - 1)))


def _digits(ids: np.ndarray) -> np.ndarray:
    """ASCII digits of non-negative ids as a (len, width) uint8 array, right-aligned (all ids share a width)."""
    width = len(str(int(ids.max()))) if len(ids) else 1
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return (ids[:, None] // powers % 10 + ord("0")).astype(np.uint8)


def _width_groups(ids: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of sorted ids that print with the same number of digits."""
    widths = np.char.str_len(ids.astype(str))
    return np.split(ids, np.flatnonzero(np.diff(widths)) + 1)


def write_edges(target, n_layer: int, d_mlp: int, progress=None, rows_per_write: int = 256):
    """
    Stream the canonical adjacent-layer edge list 'src tgt\n', vectorised: a block of sources is written as
    one (sources x targets x line-bytes) array, with the digits broadcast into place.
    """
    with atomic_open(target, "wb") as f:
        for layer in range(n_layer - 1):
            tgt_groups = _width_groups(np.arange((layer + 1) * d_mlp, (layer + 2) * d_mlp, dtype=np.int64))
            for src_group in _width_groups(np.arange(layer * d_mlp, (layer + 1) * d_mlp, dtype=np.int64)):
                for lo in range(0, len(src_group), rows_per_write):
                    src = _digits(src_group[lo:lo + rows_per_write])
                    ws = src.shape[1]
                    parts = []
                    for tgt_ids in tgt_groups:
                        tgt = _digits(tgt_ids)
                        wt = tgt.shape[1]
                        block = np.empty((len(src), len(tgt), ws + wt + 2), dtype=np.uint8)
                        block[:, :, :ws] = src[:, None, :]
                        block[:, :, ws] = ord(" ")
                        block[:, :, ws + 1:ws + 1 + wt] = tgt[None, :, :]
                        block[:, :, -1] = ord("\n")
                        parts.append(block.reshape(len(src), -1))
                    f.write((np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]).tobytes())
            if progress is not None:
                progress.update(1)


def graph_meta(m: str, n_layer: int, d_mlp: int, edges_file: Path | None, site: dict | None = None) -> dict:
    """site: the architecture and neuron-site definition (gelutrace.model.sites.site_info), recorded as given."""
    meta = {"model": m, "n_layer": n_layer, "d_mlp": d_mlp, "num_neurons": n_layer * d_mlp,
            "layer_sizes": [d_mlp] * n_layer, "connectivity": "adjacent_full",
            "num_edges": (n_layer - 1) * d_mlp * d_mlp, "edges_file": None, **(site or {})}
    if edges_file is not None:
        st = Path(edges_file).stat()
        meta["edges_file"] = {"name": Path(edges_file).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return meta


def write_graph_files(directory, m: str, n_layer: int, d_mlp: int, write_el: bool = True, progress=None,
                      site: dict | None = None):
    """Stage a's files: attributes, (optionally) the canonical .el, and the metadata that describes them."""
    write_csv(neuron_attributes(n_layer, d_mlp), path(directory, ATTRIBUTES, m))
    el = path(directory, EDGES, m)
    if write_el:
        write_edges(el, n_layer, d_mlp, progress)
    write_json(graph_meta(m, n_layer, d_mlp, el if write_el else None, site), path(directory, GRAPH_META, m), indent=2)


def write_graph_files_if_stale(directory, m: str, n_layer: int, d_mlp: int, write_el: bool = True, progress=None,
                               site: dict | None = None, into=None):
    """
    Stage a's files, keeping an existing canonical .el of the same shape in `directory` instead of writing it
    again. They are written into `into` (an OutputSet's staging directory) when given, else into `directory`.
    """
    into = directory if into is None else into
    try:
        meta = read_graph_meta(directory, m)
        same = (meta.get("n_layer"), meta.get("d_mlp")) == (n_layer, d_mlp) and meta.get("edges_file")
        if same and path(directory, EDGES, m).is_file() and edges_are_canonical(directory, m, meta):
            write_csv(neuron_attributes(n_layer, d_mlp), path(into, ATTRIBUTES, m))
            if Path(into) != Path(directory) or (site is not None and any(meta.get(k) != v for k, v in site.items())):
                write_json({**meta, **(site or {})}, path(into, GRAPH_META, m), indent=2)
            return
    except PipelineError:
        pass
    write_graph_files(into, m, n_layer, d_mlp, write_el, progress, site)


def read_graph_meta(directory, m: str) -> dict:
    p = path(directory, GRAPH_META, m)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage a or b writes it)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{p} is not valid JSON: {e}") from None


def edges_are_canonical(directory, m: str, meta: dict) -> bool:
    """True when the .el is absent or exactly the file stage a/b wrote; False when a user edited it."""
    el = path(directory, EDGES, m)
    if not el.is_file():
        return True
    rec = meta.get("edges_file")
    if not rec:
        return False  # an .el nobody recorded: honour it
    st = el.stat()
    return st.st_size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]


def read_edges(directory, m: str) -> np.ndarray:
    """A (user-edited) edge list as an (E, 2) int64 array; the canonical one is never parsed."""
    el = path(directory, EDGES, m)
    try:
        data = np.loadtxt(el, dtype=np.int64, ndmin=2)
    except Exception as e:
        raise PipelineError(f"cannot parse edge list {el}: {e}") from None
    if data.size and data.shape[1] != 2:
        raise PipelineError(f"{el}: expected two ids per line")
    return data.reshape(-1, 2)


# --- stage b: activation matrix ---------------------------------------------------------------------------
def write_activation_matrix(target, active: np.ndarray, neuron_ids: np.ndarray | None = None):
    """Save a samples x neurons boolean matrix (see write_packed_activation_matrix for the format)."""
    active = np.asarray(active, dtype=bool)
    write_packed_activation_matrix(target, np.packbits(active, axis=1), active.shape[1], neuron_ids)


def write_packed_activation_matrix(target, packed: np.ndarray, n_neurons: int, neuron_ids: np.ndarray | None = None):
    """
    The activation matrix, bit-packed along the neuron axis (np.packbits, 1 bit per entry): keys `matrix`
    (uint8, samples x ceil(neurons / 8)), `matrix_shape` (samples, neurons), `neuron_ids` (the neuron id
    of each column) and `packing` ('packbits_axis1'). Read it with `read_activation_matrix`.
    """
    ids = np.arange(n_neurons, dtype=np.int64) if neuron_ids is None else np.asarray(neuron_ids, np.int64)
    write_npz(target, matrix=packed, matrix_shape=np.array([len(packed), n_neurons], dtype=np.int64),
              neuron_ids=ids, packing=np.array("packbits_axis1"))


def read_packed_activation_matrix(source):
    """
    (packed, n_neurons, neuron_ids) from a stage-b `.npz` without unpacking it: packed is the uint8
    np.packbits(active, axis=1) matrix. Loads without pickle; the original pipeline's unpacked 0/1 `matrix` is
    packed on reading.
    """
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"activation matrix {p} does not exist (stage b writes it)")
    try:
        with np.load(p, allow_pickle=False) as z:
            ids = z["neuron_ids"].astype(np.int64)
            if "packing" in z.files:
                n_samples, n_neurons = (int(x) for x in z["matrix_shape"])
                packed = z["matrix"]
                if packed.dtype != np.uint8 or packed.shape != (n_samples, (n_neurons + 7) // 8):
                    raise ValueError(f"packed matrix of shape {packed.shape}, expected {n_samples} x "
                                     f"{(n_neurons + 7) // 8} bytes")
            else:
                matrix = z["matrix"] != 0
                n_neurons = matrix.shape[1]
                packed = np.packbits(matrix, axis=1)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"cannot read activation matrix {p}: {e}") from None
    if n_neurons != len(ids):
        raise PipelineError(f"{p}: {n_neurons} columns but {len(ids)} neuron ids")
    return packed, n_neurons, ids


def read_activation_matrix(source, sparse: bool = False):
    """
    (matrix, neuron_ids) from a stage-b `.npz`: matrix is a boolean numpy array (samples x neurons), or a
    scipy.sparse CSR matrix of int8 ones with `sparse=True`. Loads without pickle. Also reads the original
    pipeline's unpacked 0/1 `matrix`.
    """
    packed, n_neurons, ids = read_packed_activation_matrix(source)
    matrix = np.unpackbits(packed, axis=1, count=n_neurons).view(bool).reshape(len(packed), n_neurons)
    if sparse:
        return sp.csr_matrix(matrix, dtype=np.int8), ids
    return matrix, ids


class _ByteTables:
    """Byte strings per neuron (one per table), to concatenate those of each sample's active neurons with numpy
    gathers: a Python join over every active neuron of every sample costs seconds per thousand samples. Ids
    whose strings keep their lengths form runs (the strings of growing ids grow), gathered as fixed-size items."""

    def __init__(self, *tables: list[bytes]):
        lengths = np.array([[len(b) for b in t] for t in tables], np.int64).reshape(len(tables), -1)
        cuts = np.flatnonzero(np.diff(lengths, axis=1).any(axis=0)) + 1
        bounds = list(zip(np.r_[0, cuts].tolist(), np.r_[cuts, lengths.shape[1]].tolist()))
        self.runs = [(lo, hi, [np.frombuffer(b"".join(t[lo:hi]), f"V{len(t[lo])}") for t in tables])
                     for lo, hi in bounds if hi > lo]
        self.n_tables = len(tables)

    def rows(self, bits: np.ndarray) -> list[list[bytes]]:
        """For each table, each row of a bool (rows x neurons) block: its set columns' strings in id order."""
        parts = [[] for _ in range(self.n_tables)]
        for lo, hi, tables in self.runs:
            sub = bits[:, lo:hi]
            cols = np.nonzero(sub)[1]
            counts = np.cumsum(sub.sum(axis=1))
            for part, table in zip(parts, tables):
                buf, ends = table[cols].tobytes(), counts * table.itemsize
                part.append([buf[a:b] for a, b in zip(np.r_[0, ends[:-1]].tolist(), ends.tolist())])
        return [[b"".join(r) for r in zip(*p)] if p else [b""] * len(bits) for p in parts]


def write_activation_lists(directory, m: str, packed: np.ndarray, n_neurons: int, block: int = 64):
    """
    `{m}_neuron_activations.json` and `.pickle`: {str(sample_id): sorted list of active neuron ids}, as the
    original wrote them, streamed a block of samples at a time (the lists of a big run would not fit in
    memory as Python objects). The pickle is written opcode by opcode (protocol 2, no memo), so that
    `pickle.load` returns the plain dict.
    """
    strings = _ByteTables([str(i).encode() + b", " for i in range(n_neurons)],
                          [_pickle_int(i) for i in range(n_neurons)])
    with atomic_open(path(directory, ACTIVATIONS_JSON, m), "wb") as fj, \
            atomic_open(path(directory, ACTIVATIONS_PICKLE, m), "wb") as fp:
        fj.write(b"{")
        fp.write(b"\x80\x02}")  # PROTO 2, EMPTY_DICT
        for lo in range(0, len(packed), block):
            rows = np.unpackbits(packed[lo:lo + block], axis=1, count=n_neurons).view(bool)
            fp.write(b"(")  # MARK: the block's key/value pairs follow, then SETITEMS
            json_rows, pickle_rows = strings.rows(rows)
            for k in range(len(rows)):
                sid = lo + k
                key = str(sid).encode()
                fj.write((b", " if sid else b"") + b'"' + key + b'": [' + json_rows[k][:-2] + b"]")
                fp.write(b"X" + len(key).to_bytes(4, "little") + key)  # BINUNICODE
                fp.write(b"](" + pickle_rows[k] + b"e")  # EMPTY_LIST MARK ints APPENDS
            fp.write(b"u")
        fj.write(b"}\n")
        fp.write(b".")


def _pickle_int(i: int) -> bytes:
    """The pickle opcode pushing a non-negative int: BININT1 (< 256), BININT2 (< 65536) or BININT."""
    if i < 256:
        return b"K" + i.to_bytes(1, "little")
    if i < 65536:
        return b"M" + i.to_bytes(2, "little")
    return b"J" + i.to_bytes(4, "little", signed=True)


def packed_counts(packed: np.ndarray, n_neurons: int, n_layer: int, block: int = 1024):
    """Per-neuron activation counts (N,) and per-sample, per-layer active counts (S, L) of a bit-packed matrix."""
    counts = np.zeros(n_neurons, dtype=np.int64)
    per_layer = np.zeros((len(packed), n_layer), dtype=np.int64)
    for lo in range(0, len(packed), block):
        rows = np.unpackbits(packed[lo:lo + block], axis=1, count=n_neurons).view(bool)
        counts += rows.sum(axis=0)
        per_layer[lo:lo + block] = rows.reshape(len(rows), n_layer, -1).sum(axis=2)
    return counts, per_layer


# --- per-neuron columns (stage b's frequency file, the neuron-effects file) ------------------------------
def read_neuron_column(source, column: str, n_neurons: int, what: str, missing_ok: bool = False,
                       optional: bool = False) -> np.ndarray | None:
    """
    One float64 value per neuron, in id order, from a CSV with `neuron_id` and `column` (e.g. the frequency
    file's mean_activation or attribution). `what` says which stage writes it, for the error line. With
    `missing_ok`, the file may list some neurons only: the others are NaN. With `optional`, a file without the
    column (or with it empty) gives None.
    """
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist ({what})")
    try:
        df = pd.read_csv(p)
    except Exception as e:
        raise PipelineError(f"cannot parse {p}: {e}") from None
    if optional and (column not in df.columns or df[column].isna().all()):
        return None
    if column not in df.columns or "neuron_id" not in df.columns:
        raise PipelineError(f"{p} has no neuron_id/{column} columns (written by an older version?); {what}")
    ids = pd.to_numeric(df["neuron_id"], errors="coerce").to_numpy()
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(np.float64)
    complete = len(ids) == n_neurons and np.array_equal(ids, np.arange(n_neurons))
    if not complete and not (missing_ok and np.isfinite(ids).all() and len(np.unique(ids)) == len(ids)
                             and ((ids >= 0) & (ids < n_neurons)).all() and (ids == np.round(ids)).all()):
        raise PipelineError(f"{p} must list {'distinct neurons of' if missing_ok else 'all'} the model's "
                            f"{n_neurons} neurons{'' if missing_ok else ' in id order'}")
    if not np.isfinite(values).all():
        raise PipelineError(f"{p}: {column} holds missing or non-finite values ({what})")
    if complete:
        return values
    out = np.full(n_neurons, np.nan)
    out[ids.astype(np.int64)] = values
    return out


def read_top_examples(source) -> pd.DataFrame:
    """{m}_neuron_top_examples.csv, checked: TOP_EXAMPLES_COLUMNS, whole non-negative ids and ranks, float values,
    and the context and token texts as written (an empty or "NA" token stays text)."""
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage b writes it unless --top_examples 0)")
    try:
        df = pd.read_csv(p, dtype={"context": str, "token": str}, keep_default_na=False, encoding="utf-8")
        if list(df.columns) != TOP_EXAMPLES_COLUMNS:
            raise ValueError(f"columns {list(df.columns)}, expected {TOP_EXAMPLES_COLUMNS}")
        if df.empty:  # a shard that was given no window: the columns' types cannot be read from no rows
            df = df.astype({"neuron_id": np.int64, "rank": np.int64, "sample_id": np.int64})
        for c in ("neuron_id", "rank", "sample_id"):
            if not pd.api.types.is_integer_dtype(df[c]) or (df[c] < 0).any():
                raise ValueError(f"column {c} holds values that are not whole numbers >= 0")
        df = df.astype({"value": np.float64})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise PipelineError(f"cannot read {p} as top examples: {e}") from None
    return df


def read_dataset_samples(directory, m: str) -> list[tuple[int, list[int], np.ndarray]]:
    """
    The (prompt, repeat) samples of a stage-b dataset in file order, from {m}_activation_dataset.csv: per
    sample its prompt_sample_idx, its prompt's ids (input_text_ids) and its continuation (output_id of
    token_position 0, 1, ...).
    """
    p = path(directory, DATASET, m)
    if not p.is_file():
        raise PipelineError(f"{p} does not exist (stage b writes it)")
    cols = ["prompt_sample_idx", "token_position", "input_text_ids", "output_id"]
    try:
        df = pd.read_csv(p, usecols=cols, dtype={"input_text_ids": str}, keep_default_na=False)
        repeat, position, output = (df[c].to_numpy(np.int64) for c in ("prompt_sample_idx", "token_position",
                                                                        "output_id"))
        texts = df["input_text_ids"].to_numpy()
        starts = np.flatnonzero(position == 0)
        if len(df) and (len(starts) == 0 or starts[0] != 0):
            raise ValueError("the first row's token_position is not 0")
        ends = np.r_[starts[1:], len(df)]
        bad = [s for s, e in zip(starts, ends) if not np.array_equal(position[s:e], np.arange(e - s))
               or (repeat[s:e] != repeat[s]).any() or (texts[s:e] != texts[s]).any()]
        if bad:
            raise ValueError(f"the sample starting at row {bad[0] + 2} has non-consecutive token positions or "
                             f"changes prompt_sample_idx / input_text_ids")
        parsed = {t: json.loads(t) for t in set(texts[starts])}
        if not all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in parsed.values()):
            raise ValueError("input_text_ids is not a list of token ids")
    except (ValueError, KeyError) as e:
        raise PipelineError(f"cannot read {p} as a stage-b dataset: {e}") from None
    return [(int(repeat[s]), parsed[texts[s]], output[s:e].copy()) for s, e in zip(starts, ends)]


# --- stage d: subsets -------------------------------------------------------------------------------------
def read_subset(source, n_neurons: int | None = None) -> np.ndarray:
    """A subset `.npy` as int64 ids, checked: a 1-D integer array, loaded without pickle, ids in [0, n_neurons)."""
    p = Path(source)
    if not p.is_file():
        raise PipelineError(f"subset {p} does not exist")
    try:
        ids = np.load(p, allow_pickle=False)
    except Exception as e:
        raise PipelineError(f"cannot read subset {p} as a .npy array without pickle: {e}") from None
    if not isinstance(ids, np.ndarray) or ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        shape = f"shape {ids.shape}, dtype {ids.dtype}" if isinstance(ids, np.ndarray) else "several arrays"
        raise PipelineError(f"subset {p} must be a 1-D integer array of neuron ids, got {shape}")
    ids = ids.astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        vals, counts = np.unique(ids, return_counts=True)
        raise PipelineError(f"subset {p} lists neuron {int(vals[counts > 1][0])} more than once "
                            f"({int((counts > 1).sum())} repeated ids); a subset is a set of distinct neurons")
    if n_neurons is not None:
        bad = ids[(ids < 0) | (ids >= n_neurons)]
        if len(bad):
            raise PipelineError(f"subset {p} holds id {int(bad[0])} outside this model's neurons "
                                f"0..{n_neurons - 1} ({len(bad)} out-of-range ids)")
    return ids
