"""OpenAI-compatible routes (filled in by the OpenAI router work)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
