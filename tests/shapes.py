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
