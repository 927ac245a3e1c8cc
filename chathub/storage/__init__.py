"""Relational storage: tables, repositories, migrations and the blob store."""
