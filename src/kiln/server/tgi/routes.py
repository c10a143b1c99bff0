"""TGI routes (filled in by the TGI router work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
