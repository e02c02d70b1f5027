"""
The files a corpus is read from, and their documents, read from disk as they are consumed (memory stays flat in
the size of a file).

Formats, by the end of a file's name:
- `.txt`, `.txt.gz`, `.txt.zst`: one document, UTF-8 text, read (and decompressed) a block at a time;
- `.jsonl`, `.jsonl.gz`, `.json.gz` (JSON lines, as C4 ships them), `.jsonl.zst`: one document per line, in the
  field --text_field (default `text`), a line at a time; blank lines are skipped;
- `.parquet`: one document per row, in the string column --text_field, BATCH_ROWS rows at a time;
- `.arrow`: Arrow IPC (the stream format `datasets.save_to_disk` writes, or the file format), the same way.
A directory written by `datasets.save_to_disk` (a `state.json` or `dataset_info.json` beside `.arrow` files) is
its `.arrow` files, in the order `state.json` lists them under `_data_files`, else sorted by name; any other
directory is the corpus files in it (not its subdirectories), sorted by name.
"""

import codecs
import gzip
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from gelutrace import PipelineError
from gelutrace.files import atomic

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".txt.gz": "txt.gz", ".jsonl.gz": "jsonl.gz", ".json.gz": "json.gz",
           ".txt.zst": "txt.zst", ".jsonl.zst": "jsonl.zst", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_FORMATS = ("txt", "txt.gz", "txt.zst")  # a file is one document: no field
TABLE_FORMATS = ("parquet", "arrow")
DEFAULT_FIELD = "text"
DATASET_MARKERS = ("state.json", "dataset_info.json")  # beside the .arrow files of datasets.save_to_disk
READ_BYTES = 1 << 20  # a file is read this many bytes at a time
ZSTD_READ_BYTES = 1 << 16  # compressed bytes read at a time by the zstandard reader
BATCH_ROWS = 1024  # Parquet and Arrow rows turned into text at a time
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end of an Arrow IPC stream


def file_format(p: Path) -> str | None:
    """The format a file's name gives (FORMATS), None for any other file."""
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if p.name.endswith(suffix) and len(p.name) > len(suffix):
            return FORMATS[suffix]
    return None


def add_text_field_arg(ap, text_flag: str):
    ap.add_argument("--text_field", default=DEFAULT_FIELD, metavar="NAME",
                    help=f"the field (JSON lines) or column (Parquet, Arrow) of {text_flag} that holds each "
                         f"document's text (default: %(default)s)")


# --- which files ---------------------------------------------------------------------------------------------
def is_arrow_dataset(d: Path) -> bool:
    return any((d / m).is_file() for m in DATASET_MARKERS) and any(q.is_file() for q in d.glob("*.arrow"))


def arrow_dataset_files(d: Path) -> list[Path]:
    """The .arrow files of a datasets.save_to_disk directory, in the order its state.json lists them."""
    state = d / "state.json"
    if not state.is_file():
        return sorted(q for q in d.glob("*.arrow") if q.is_file())
    try:
        listed = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"cannot read {state}: {e}") from None
    if not isinstance(listed, dict) or "_data_files" not in listed:
        return sorted(q for q in d.glob("*.arrow") if q.is_file())
    entries = listed["_data_files"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("filename"), str)
                                                for e in entries):
        raise PipelineError(f"{state}: _data_files is not a list of {{\"filename\": ...}}")
    files = []
    for e in entries:
        name = e["filename"]
        q = d / name
        if Path(name).name != name or not name.endswith(".arrow"):
            raise PipelineError(f"{state} lists {name!r}: expected the name of an .arrow file in {d}")
        if not q.is_file():
            raise PipelineError(f"{state} lists {name}, which is not in {d}")
        files.append(q)
    return files


def corpus_files(inputs: list[str], flag: str = "--input_text") -> list[Path]:
    """The corpus files the inputs name, in order (a directory's as the module says); a file named twice is
    refused."""
    files = []
    others = ", ".join(s for s in FORMATS if s not in (".txt", ".jsonl"))
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            if is_arrow_dataset(p):
                found = arrow_dataset_files(p)
            else:
                found = sorted(q for q in p.iterdir() if q.is_file() and file_format(q))
            if not found:
                hint = (": it holds a dataset_dict.json, so give one split's directory"
                        if (p / "dataset_dict.json").is_file() else "")
                raise PipelineError(f"{flag} directory {p} holds no .txt or .jsonl file (nor {others}){hint}")
            files += found
        elif p.is_file():
            if file_format(p) is None:
                raise PipelineError(f"{flag} {p}: expected a .txt or .jsonl file (or {others}), or a directory "
                                    f"of them")
            files.append(p)
        else:
            raise PipelineError(f"{flag} {p} does not exist")
    seen = {}
    for p in files:
        if p.stat().st_size == 0:
            raise PipelineError(f"{p} is empty")
        if p.resolve() in seen:
            raise PipelineError(f"{flag} names {p} twice (also as {seen[p.resolve()]}): its documents would count twice")
        seen[p.resolve()] = p
    return files


# --- a file's record -----------------------------------------------------------------------------------------
def file_record(p: Path, field: str) -> dict:
    """format, field (None for a text file) and sha256 of the file's bytes as stored."""
    fmt = file_format(p)
    return {"format": fmt, "field": None if fmt in TEXT_FORMATS else field, "sha256": atomic.file_sha256(p)}


def record_format(f: dict) -> str:
    """A corpus record's file's format; a record without one (an older version's) names a .txt or .jsonl."""
    return f.get("format") or file_format(Path(f["path"])) or "txt"


def record_field(f: dict) -> str | None:
    if "field" in f:
        return f["field"]
    return None if record_format(f) in TEXT_FORMATS else DEFAULT_FIELD


def record_text_field(record: dict) -> str:
    """The --text_field a corpus record's files were read with."""
    return next((record_field(f) for f in record["files"] if record_field(f)), DEFAULT_FIELD)


def record_documents(f: dict) -> Iterator[Iterable[str]]:
    """The documents of a file of a corpus record, read as it was read."""
    return file_documents(Path(f["path"]), record_field(f) or DEFAULT_FIELD, record_format(f))


# --- bytes ---------------------------------------------------------------------------------------------------
def _file_blocks(p: Path) -> Iterator[bytes]:
    try:
        with open(p, "rb") as f:
            while block := f.read(READ_BYTES):
                yield block
    except OSError as e:
        raise PipelineError(f"cannot read {p}: {e.strerror}") from None


def _gzip_blocks(p: Path) -> Iterator[bytes]:
    """A gzip file's decompressed bytes, a block at a time; a stream cut short is refused (gzip's EOFError)."""
    out = 0
    try:
        with gzip.open(p, "rb") as f:
            while block := f.read(READ_BYTES):
                out += len(block)
                yield block
    except EOFError:
        raise PipelineError(f"{p}: the gzip stream is cut short (truncated): its {p.stat().st_size} bytes end inside "
                            f"a compressed member ({out} decompressed bytes read before)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise PipelineError(f"{p} is not valid gzip data (after {out} decompressed bytes): {e}") from None
    except OSError as e:
        raise PipelineError(f"cannot read {p}: {e.strerror or e}") from None


def _zstd_blocks(p: Path) -> Iterator[bytes]:
    """A zstandard file's decompressed bytes, a block at a time, frame after frame; a stream cut short is
    refused (_zstd_cut)."""
    import zstandard  # lazy: only zstd-compressed corpora need it

    out = 0
    try:
        with open(p, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_size=ZSTD_READ_BYTES, read_across_frames=True)
            try:
                while block := reader.read(READ_BYTES):
                    out += len(block)
                    yield block
            except zstandard.ZstdError as e:
                raise PipelineError(f"{p} is not valid zstandard data (after {out} decompressed bytes): {e}") from None
            cut = _zstd_cut(f)
    except OSError as e:
        raise PipelineError(f"cannot read {p}: {e.strerror or e}") from None
    if cut is not None:
        raise PipelineError(f"{p}: the zstandard stream is cut short (truncated): a frame starting at compressed "
                            f"byte {cut} is incomplete ({out} decompressed bytes read)")


ZSTD_MAGIC, ZSTD_SKIPPABLE = 0xFD2FB528, 0x184D2A50  # a frame's first 4 bytes (a skippable one's, but the last 4 bits)


def _zstd_cut(f) -> int | None:
    """
    Where a zstandard file's last frame starts if that frame is cut short (None when every frame is whole): its
    frame and block headers are walked without decompressing. zstandard's stream_reader (like read_to_iter) ends
    a stream cut inside a frame as if it were whole, and decompressobj, which tells a frame's end, holds all the
    output of its input at once.
    """
    size = f.seek(0, 2)
    pos = 0
    while pos < size:
        start = pos
        f.seek(pos)
        head = f.read(5)
        if len(head) < 5:
            return start
        magic = int.from_bytes(head[:4], "little")
        if magic & 0xFFFFFFF0 == ZSTD_SKIPPABLE:
            f.seek(pos + 4)
            n = f.read(4)
            if len(n) < 4:
                return start
            pos += 8 + int.from_bytes(n, "little")
        elif magic == ZSTD_MAGIC:
            fhd = head[4]
            single = bool(fhd & 0x20)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            pos += 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            last = False
            while not last:
                f.seek(pos)
                b = f.read(3)
                if len(b) < 3:
                    return start
                v = int.from_bytes(b, "little")
                last, kind, n = bool(v & 1), (v >> 1) & 3, v >> 3
                pos += 3 + (1 if kind == 1 else n)  # an RLE block holds one byte, repeated n times
            pos += 4 if fhd & 4 else 0  # the content checksum
        else:
            return None  # not a frame: the decompressor has said what is wrong
        if pos > size:
            return start
    return None


def _blocks(p: Path, fmt: str) -> Iterator[bytes]:
    if fmt.endswith(".gz"):
        return _gzip_blocks(p)
    if fmt.endswith(".zst"):
        return _zstd_blocks(p)
    return _file_blocks(p)


def _not_utf8(p: Path, at: int, byte: int, fmt: str = "txt") -> PipelineError:
    where = f"byte {at}" if "." not in fmt else f"byte {at} of its decompressed text"
    return PipelineError(f"{p} is not UTF-8 text: {where} (0x{byte:02x}) cannot be decoded")


# --- documents -----------------------------------------------------------------------------------------------
def _text(p: Path, fmt: str) -> Iterator[str]:
    """A text file's text (its one document), a block at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, first = 0, True
    for block in itertools.chain(_blocks(p, fmt), [b""]):
        held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise _not_utf8(p, offset - held + e.start, e.object[e.start], fmt) from None
        offset += len(block)
        if first and text:
            text, first = text.removeprefix("\ufeff"), False  # a byte-order mark is no text
        if text:
            yield text


def _lines(blocks: Iterable[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset, bytes) of each line of the blocks; a line is held whole, once."""
    def joined(parts: list) -> bytes:  # the parts let go before the line is handed on
        line = b"".join(parts)
        parts.clear()
        return line

    pending, k, offset = [], 1, 0
    for block in blocks:
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            pending.append(block[start:end])
            size = sum(map(len, pending))
            yield k, offset, joined(pending)
            k, offset, start = k + 1, offset + size + 1, end + 1
        pending.append(block[start:])
    yield k, offset, joined(pending)


def jsonl_text(p: Path, k: int, line: str, field: str = DEFAULT_FIELD) -> str | None:
    """The document of line k of a JSON-lines file (its field `field`); None for a blank line."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{p} line {k}: not JSON ({e.msg})") from None
    if not isinstance(rec, dict) or field not in rec:
        raise PipelineError(f"{p} line {k}: no field {field!r}")
    text = rec[field]
    if not isinstance(text, str):
        raise PipelineError(f"{p} line {k}: field {field!r} is not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape such as \ud800 that pairs with no other
        raise PipelineError(f"{p} line {k}: field {field!r} holds a lone surrogate (U+{ord(text[e.start]):04X} "
                            f"at character {e.start}), which is not text") from None
    return text


def _jsonl_documents(p: Path, field: str, fmt: str) -> Iterator[Iterable[str]]:
    for k, offset, raw in _lines(_blocks(p, fmt)):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(p, offset + e.start, raw[e.start], fmt) from None
        del raw
        if k == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark is no text
        text = jsonl_text(p, k, line, field)
        del line
        if text is not None:
            yield (text,)


def _check_column(p: Path, schema, field: str) -> int:
    """The index of the string column `field` in a Parquet or Arrow schema."""
    import pyarrow as pa  # lazy: only Parquet and Arrow corpora need pyarrow

    i = schema.get_field_index(field)
    if i < 0:
        raise PipelineError(f"{p} has no column {field!r} (its columns: {', '.join(schema.names) or 'none'}); "
                            f"--text_field names the text's column")
    t = schema.field(i).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise PipelineError(f"{p}: column {field!r} holds {schema.field(i).type}, not strings")
    return i


def _parquet_columns(p: Path, field: str) -> Iterator:
    import pyarrow as pa  # lazy: only Parquet and Arrow corpora need pyarrow
    import pyarrow.parquet as pq  # lazy: only Parquet and Arrow corpora need pyarrow

    row = 0
    try:
        with pq.ParquetFile(p) as pf:
            _check_column(p, pf.schema_arrow, field)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[field], use_threads=False):
                yield batch.column(0)
                row += batch.num_rows
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PipelineError(f"{p} is not a readable Parquet file (after row {row}): {e}") from None


def _arrow_columns(p: Path, field: str) -> Iterator:
    """
    The column of each record batch of an Arrow IPC stream, or of an IPC file (it starts with the magic ARROW1).
    A stream cut between two batches reads as a shorter whole one, so a stream must end with the end-of-stream
    marker its writer writes on closing.
    """
    import pyarrow as pa  # lazy: only Parquet and Arrow corpora need pyarrow

    row = 0
    try:
        with pa.OSFile(str(p), "rb") as f:
            stream = f.read(6) != b"ARROW1"
            f.seek(0)
            if stream:
                reader = pa.ipc.open_stream(f)
                batches = iter(reader.read_next_batch, None)
            else:
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(b) for b in range(reader.num_record_batches))
            i = _check_column(p, reader.schema, field)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                yield batch.column(i)
                row += batch.num_rows
            if stream:
                size = f.size()
                f.seek(max(0, size - len(ARROW_EOS)))
                if f.read(len(ARROW_EOS)) != ARROW_EOS:
                    raise PipelineError(f"{p}: the Arrow stream is cut short (no end-of-stream marker after row "
                                        f"{row}, byte {size})")
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PipelineError(f"{p} is not a readable Arrow file (after row {row}): {e}") from None


def _table_documents(p: Path, field: str, fmt: str) -> Iterator[Iterable[str]]:
    """One document per row (counted from 1 in messages), BATCH_ROWS rows turned into text at a time."""
    row = 0
    columns = _parquet_columns(p, field) if fmt == "parquet" else _arrow_columns(p, field)
    for column in columns:
        for lo in range(0, len(column), BATCH_ROWS):
            part = column.slice(lo, BATCH_ROWS)
            if part.null_count:
                k = next(j for j in range(len(part)) if not part[j].is_valid)
                raise PipelineError(f"{p} row {row + k + 1}: field {field!r} is null")
            try:
                texts = part.to_pylist()
            except UnicodeDecodeError:
                for k in range(len(part)):
                    try:
                        part[k].as_py()
                    except UnicodeDecodeError as e:
                        raise PipelineError(f"{p} row {row + k + 1}: field {field!r} is not UTF-8 text (byte "
                                            f"{e.start} cannot be decoded)") from None
                raise
            del part
            for text in texts:
                row += 1
                yield (text,)
            del texts


def file_documents(p: Path, field: str = DEFAULT_FIELD, fmt: str | None = None) -> Iterator[Iterable[str]]:
    """
    The documents of a corpus file in order, each as pieces of its text, read from disk as they are consumed: a
    text file is one document, read a block at a time; a JSON-lines file one document per line, parsed a line
    at a time; a Parquet or Arrow file one document per row, BATCH_ROWS at a time.
    """
    fmt = fmt or file_format(p) or "txt"
    if fmt in TEXT_FORMATS:
        yield _text(p, fmt)
        return
    found = False
    docs = _table_documents(p, field, fmt) if fmt in TABLE_FORMATS else _jsonl_documents(p, field, fmt)
    for doc in docs:
        found = True
        yield doc
    if not found:
        raise PipelineError(f"{p} holds no documents")
