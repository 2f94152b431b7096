"""The pieces a report is made of (rendered to markdown and HTML by `render.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    text: str
    small: bool = False


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    align: str | None = None
    bold_rows: list[int] = field(default_factory=list)


@dataclass
class Image:
    name: str
    png: bytes
    caption: str


@dataclass
class Code:
    text: str
    lang: str = ""


Block = Union[Heading, Para, Bullets, Table, Image, Code]
