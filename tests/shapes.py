"""A pydantic schema with nesting, an enum, an array and required fields, whose strings and
arrays are bounded so that a random-weight model under its grammar also reaches the end."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: int
    y: int


class Shape(BaseModel):
    """A shape: nested points, an enum, an array and required fields."""

    name: str = Field(max_length=12)
    colour: Colour
    corners: list[Point] = Field(max_length=3)
    closed: bool
    note: str | None = Field(default=None, max_length=8)


class Birth(BaseModel):
    """When a person was born: number ranges, as pydantic writes them (ge/le: minimum and
    maximum; gt/lt: exclusiveMinimum and exclusiveMaximum), on integers and a float."""

    person: str = Field(max_length=16)
    year: int = Field(ge=0, le=3000)
    month: int = Field(ge=1, le=12)
    share: float = Field(gt=0, le=1)
    rank: int | None = Field(default=None, gt=-5, lt=5)

    def in_range(self) -> bool:
        return (0 <= self.year <= 3000 and 1 <= self.month <= 12 and 0 < self.share <= 1
                and (self.rank is None or -5 < self.rank < 5))
