"""Prompt styles as A1111's `styles.csv` (modules/styles.py): named prompt and negative-prompt
snippets that a request applies by name.

The file has a header row with the columns `name`, `prompt` and `negative_prompt` (A1111's older
`name, text` layout is read too); it is UTF-8, with or without a byte-order mark, quoted as
Python's csv module (Excel's dialect) writes it. A style text containing `{prompt}` has the
user's prompt put there; any other text is appended after ", " (empty parts are left out).
Rows with an empty name or a name starting with "#" are skipped; a later row replaces an
earlier one of the same name, as A1111.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import SdloomError


@dataclass(frozen=True)
class PromptStyle:
    """One style: A1111's PromptStyle (name, prompt, negative_prompt)."""
    name: str
    prompt: str = ""
    negative_prompt: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


NO_STYLE = PromptStyle("None")  # what an unknown name applies, as A1111 (no text)


def merge_prompt(style_text: str, prompt: str) -> str:
    """A1111's merge_prompts: `{prompt}` in the style is replaced by the prompt; otherwise the
    two are joined with ", ", each stripped, empty ones left out."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(t for t in (prompt.strip(), style_text.strip()) if t)


class StyleDB:
    """Styles by name, in file order."""

    def __init__(self, styles: list[PromptStyle] | None = None):
        self.styles: dict[str, PromptStyle] = {}
        for s in styles or []:
            self.styles[s.name] = s

    def __len__(self) -> int:
        return len(self.styles)

    def __contains__(self, name: str) -> bool:
        return name in self.styles

    def list(self) -> list[dict[str, str]]:
        """GET /sdapi/v1/prompt-styles: [{name, prompt, negative_prompt}]."""
        return [s.as_dict() for s in self.styles.values()]

    def unknown(self, names: list[str]) -> list[str]:
        return [n for n in names if n not in self.styles]

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str]:
        """The prompt and negative prompt with the styles merged in, in order. An unknown name
        merges an empty text, as A1111 (which strips the prompt and nothing else)."""
        for n in names:
            s = self.styles.get(n, NO_STYLE)
            prompt = merge_prompt(s.prompt, prompt)
            negative_prompt = merge_prompt(s.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def apply_prompt(self, prompt: str, names: list[str]) -> str:
        for n in names:
            prompt = merge_prompt(self.styles.get(n, NO_STYLE).prompt, prompt)
        return prompt

    def apply_negative(self, negative_prompt: str, names: list[str]) -> str:
        for n in names:
            negative_prompt = merge_prompt(self.styles.get(n, NO_STYLE).negative_prompt,
                                           negative_prompt)
        return negative_prompt

    @classmethod
    def load(cls, paths: str | Path | list[str | Path] | None) -> StyleDB:
        """Read one or more styles files (later names replace earlier ones); any problem is one
        SdloomError naming the file and the line."""
        if paths is None:
            return cls()
        if isinstance(paths, (str, Path)):
            paths = [paths]
        db = cls()
        for p in paths:
            for s in read_styles(p):
                db.styles[s.name] = s
        return db


def read_styles(path: str | Path) -> list[PromptStyle]:
    """The styles of one A1111 styles.csv."""
    path = Path(path)
    where = f"styles file {path.name}"
    if not path.is_file():
        raise SdloomError(f"{where}: not found" if not path.exists() else f"{where}: not a file")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # the BOM A1111 writes is optional
    except UnicodeDecodeError as e:
        raise SdloomError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SdloomError(f"{where}: cannot be read ({e.strerror or type(e).__name__})") \
            from None
    if "\x00" in text:
        raise SdloomError(f"{where}: holds NUL bytes; not a CSV text file")
    lines = text.splitlines(keepends=True)
    reader = csv.DictReader(lines, skipinitialspace=True, strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise SdloomError(f"{where}, line 1: {e}") from None
    if not header:
        return []  # an empty file: no styles
    header = [h.strip() if h else h for h in header]
    reader.fieldnames = header
    if "name" not in header or not ({"prompt", "text"} & set(header)):
        raise SdloomError(f"{where}: the header must name the columns name, prompt and "
                          f"negative_prompt (found: {', '.join(map(repr, header))})")
    text_col = "prompt" if "prompt" in header else "text"
    out: list[PromptStyle] = []
    while True:
        start = reader.line_num + 1  # the line the next row starts on
        try:
            row = next(reader)
        except StopIteration:
            return out
        except csv.Error as e:
            raise SdloomError(f"{where}, line {start}: {e}") from None
        name = (row.get("name") or "").strip()
        if not name or name.startswith("#"):
            continue
        out.append(PromptStyle(name, row.get(text_col) or "", row.get("negative_prompt") or ""))
