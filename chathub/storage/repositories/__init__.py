"""Repositories: every query is scoped by ``team_id``; they flush, never commit."""
