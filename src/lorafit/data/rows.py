"""What every data format produces from a row: text segments marked trained or not, or a ``BadRow``."""

from __future__ import annotations

from dataclasses import dataclass


class BadRow(ValueError):
    """A row that cannot be rendered; the message reads after 'line N', e.g. "missing 'summary'"."""


@dataclass
class Segment:
    text: str
    trained: bool
    exact: bool = True  # False: a chat template rendered this assistant turn without part of its content


@dataclass
class Rendered:
    """prompt = everything before the trained part; response = the target text, without EOS."""

    prompt: str
    response: str
