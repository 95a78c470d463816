"""Readers for the official NegBench fine-tuning CSVs (CC12M-NegCap / CC12M-NegMCQ).

Layouts, as the official training code reads them:

  caption CSV  one (image, caption) pair per row; image column `filepath`, caption column
               `title` by default (the official scripts pass `caption`), separator TAB by
               default; all three configurable. The NegCap generator also writes a column
               `negative_captions` holding a Python list literal of an image's negated
               captions: parsed with `ast.literal_eval` (never `eval`), kept when present.
  MCQ CSV      comma-separated: `image_path`, `caption_0`..`caption_3`, `correct_answer`
               (the true option's index; `correct_answer_template` may be present, unused).

A row that cannot be used (wrong number of fields, empty path or caption, a
`negative_captions` cell that is not a list of str, an answer outside 0..3, a missing image
file when checked) is skipped, counted and listed with its line number; a file without a
required column is a `FormatError` naming the file and the column. Relative image paths are
resolved against `image_root` (default: the CSV's folder).
"""
import ast
import csv
import dataclasses
import os
import sys

from negjax import cli

NUM_OPTIONS = 4
MCQ_COLUMNS = ("image_path",) + tuple(f"caption_{i}" for i in range(NUM_OPTIONS)) + (
    "correct_answer",)
NEGATIVE_CAPTIONS = "negative_captions"


class FormatError(cli.UserError):
  """The file cannot be read as the format at all (missing column, not a CSV)."""


@dataclasses.dataclass(frozen=True)
class CaptionRow:
  key: str  # FILE:LINE
  image_path: str
  caption: str
  negative_captions: tuple = ()  # from the NegCap generator's column, when present


@dataclasses.dataclass(frozen=True)
class MCQRow:
  key: str
  image_path: str
  options: tuple  # 4 str
  answer: int


@dataclasses.dataclass
class Table:
  path: str
  rows: list  # of CaptionRow or MCQRow
  skipped: list  # of (key, reason)


def _rows(path, separator, required):
  """(line number, row dict) of a CSV with a header holding `required`; FormatError
  otherwise. Rows with a wrong field count come as (line, None)."""
  csv.field_size_limit(sys.maxsize)  # long negative_captions cells
  try:
    f = open(path, newline="", encoding="utf-8")
  except OSError as e:
    raise FormatError(f"{path}: cannot open: {e}") from e
  with f:
    reader = csv.reader(f, delimiter=separator)
    try:
      header = next(reader)
    except StopIteration:
      raise FormatError(f"{path}: empty file (expected a header row)") from None
    except csv.Error as e:
      raise FormatError(f"{path}: not a CSV: {e}") from e
    missing = [c for c in required if c not in header]
    if missing:
      sep = {"\t": "TAB", ",": "comma"}.get(separator, repr(separator))
      raise FormatError(f"{path}: missing column {', '.join(map(repr, missing))} (header: "
                        f"{header}, separator {sep})")
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        yield reader.line_num, f"not a CSV row: {e}"
        continue
      if not row:
        continue
      if len(row) != len(header):
        yield reader.line_num, f"{len(row)} fields, the header has {len(header)}"
      else:
        yield reader.line_num, dict(zip(header, row))


def _image_path(value, column, csv_path, image_root, check_images):
  """A row's image cell as a path (relative ones under `image_root`, else beside the CSV);
  ValueError when it is empty, or missing on disk and `check_images`."""
  if not value:
    raise ValueError(f"empty {column}")
  root = image_root if image_root is not None else os.path.dirname(os.path.abspath(csv_path))
  path = value if os.path.isabs(value) else os.path.join(root, value)
  if check_images and not os.path.isfile(path):
    raise ValueError(f"no image file {path}")
  return path


def parse_list(cell):
  """A `negative_captions` cell -> tuple of str. Literals only: ValueError otherwise."""
  try:
    value = ast.literal_eval(cell)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
    raise ValueError(f"negative_captions is not a list literal ({type(e).__name__})") from None
  if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
    raise ValueError(f"negative_captions is {type(value).__name__}, not a list of str")
  return tuple(value)


def read_captions(path, image_column="filepath", caption_column="title", separator="\t",
                  image_root=None, check_images=False):
  """The caption CSV as a `Table` of `CaptionRow`s."""
  rows, skipped = [], []
  for line, row in _rows(path, separator, (image_column, caption_column)):
    key = f"{path}:{line}"
    if isinstance(row, str):
      skipped.append((key, row))
      continue
    image, caption = row[image_column].strip(), row[caption_column].strip()
    negatives = ()
    try:
      image = _image_path(image, image_column, path, image_root, check_images)
      if not caption:
        raise ValueError(f"empty {caption_column}")
      if row.get(NEGATIVE_CAPTIONS, "").strip():
        negatives = parse_list(row[NEGATIVE_CAPTIONS])
    except ValueError as e:
      skipped.append((key, str(e)))
      continue
    rows.append(CaptionRow(key, image, caption, negatives))
  return Table(str(path), rows, skipped)


def read_mcq(path, image_root=None, check_images=False, separator=","):
  """The MCQ CSV as a `Table` of `MCQRow`s."""
  rows, skipped = [], []
  for line, row in _rows(path, separator, MCQ_COLUMNS):
    key = f"{path}:{line}"
    if isinstance(row, str):
      skipped.append((key, row))
      continue
    try:
      image = _image_path(row["image_path"].strip(), "image_path", path, image_root,
                          check_images)
      options = tuple(row[f"caption_{i}"].strip() for i in range(NUM_OPTIONS))
      if not all(options):
        raise ValueError("an empty option")
      try:
        answer = int(float(row["correct_answer"]))  # pandas may write 2.0
      except ValueError:
        raise ValueError(f"correct_answer {row['correct_answer']!r} is not a number") from None
      if not 0 <= answer < NUM_OPTIONS or float(row["correct_answer"]) != answer:
        raise ValueError(f"correct_answer {row['correct_answer']!r} is not one of 0..3")
    except ValueError as e:
      skipped.append((key, str(e)))
      continue
    rows.append(MCQRow(key, image, options, answer))
  return Table(str(path), rows, skipped)


def report_skips(table, file=sys.stderr, limit=10):
  """Prints the count and the first skipped rows with reasons."""
  if not table.skipped:
    return
  print(f"{table.path}: {len(table.skipped)} rows skipped, {len(table.rows)} kept",
        file=file)
  for key, reason in table.skipped[:limit]:
    print(f"  {key}: {reason}", file=file)
  if len(table.skipped) > limit:
    print(f"  ... and {len(table.skipped) - limit} more", file=file)


def load_row_image(row, size):
  """The row's image at the training resolution; OSError naming the row and file."""
  from negjax.data import annotations
  try:
    return annotations.load_image(row.image_path, size)
  except OSError as e:
    raise OSError(f"{row.key}: cannot read image {row.image_path}: {e}") from e


class CaptionSource:
  """Grain random-access source: index -> {"key", "image" (uint8 HxWx3), "caption"}.

  `size`: images are loaded at the training resolution (shorter side, centre crop)."""

  def __init__(self, table, size):
    self.rows, self.size = table.rows, size

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, index):
    row = self.rows[index]
    return {"key": row.key, "image": load_row_image(row, self.size), "caption": row.caption}


class MCQSource(CaptionSource):
  """index -> {"key", "image", "options" (4 str), "answer"}."""

  def __getitem__(self, index):
    row = self.rows[index]
    return {"key": row.key, "image": load_row_image(row, self.size), "options": row.options,
            "answer": row.answer}
