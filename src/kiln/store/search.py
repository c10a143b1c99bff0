"""Full-text search over one owner's messages, in each backend's own index (made by revision
0002): SQLite's FTS5, PostgreSQL's text search. A hit has every word of the query; nothing the
user types is read as query syntax (``AND``, ``*``, ``"``, ``:``, ``&``...); ordered best
match first (FTS5's bm25; PostgreSQL's rank over the message's length, so that a short message
that is all about the words comes first, as with bm25), then oldest first.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from kiln.errors import InvalidRequestError
from kiln.store.records import Role, SearchHit

MAX_WORDS = 32

_SQLITE = text(
    """
    SELECT m.conversation_id, c.title, m.id, m.role, m.created_at,
           snippet(messages_fts, 0, '', '', '…', 16) AS snippet
    FROM messages_fts
    JOIN messages AS m ON m.seq = messages_fts.rowid
    JOIN conversations AS c ON c.id = m.conversation_id
    WHERE messages_fts MATCH :match AND c.owner = :owner
    ORDER BY rank, m.seq LIMIT :limit
    """
)

# NOTE: the document expression is the index's (revision 0002), character for character, so
# that the planner uses the index. ts_headline runs on the page of hits only.
_DOCUMENT = "to_tsvector('simple'::regconfig, left(m.content, 100000))"
_POSTGRESQL = text(
    f"""
    SELECT hits.conversation_id, hits.title, hits.id, hits.role, hits.created_at,
           ts_headline('simple'::regconfig, hits.content, hits.query,
                       'StartSel="", StopSel="", MaxWords=16, MinWords=8, ShortWord=0, '
                       'MaxFragments=1, FragmentDelimiter=" … "') AS snippet
    FROM (
        SELECT m.conversation_id, c.title, m.id, m.role, m.created_at, m.content, m.seq, q.query,
               ts_rank({_DOCUMENT}, q.query, 2) AS score
        FROM messages AS m
        JOIN conversations AS c ON c.id = m.conversation_id
        CROSS JOIN plainto_tsquery('simple'::regconfig, :words) AS q (query)
        WHERE c.owner = :owner AND {_DOCUMENT} @@ q.query
        ORDER BY score DESC, m.seq LIMIT :limit
    ) AS hits
    ORDER BY hits.score DESC, hits.seq
    """
)


def words(query: str) -> list[str]:
    if not isinstance(query, str):
        raise InvalidRequestError("a search query must be a string")
    return query.replace("\x00", " ").split()[:MAX_WORDS]


def search(connection: Connection, owner: str, query: str, limit: int) -> list[SearchHit]:
    found = words(query)
    if not found:
        return []
    if connection.dialect.name == "sqlite":
        # Each word quoted: an FTS5 phrase, never an operator or a column filter.
        match = " ".join('"' + word.replace('"', '""') + '"' for word in found)
        rows = connection.execute(_SQLITE, {"match": match, "owner": owner, "limit": limit})
    else:
        # plainto_tsquery reads its text as plain words ANDed together: no syntax at all.
        rows = connection.execute(
            _POSTGRESQL, {"words": " ".join(found), "owner": owner, "limit": limit}
        )
    return [
        SearchHit(
            conversation_id=row[0],
            conversation_title=row[1],
            message_id=row[2],
            role=Role(row[3]),
            created_at=row[4],
            snippet=row[5],
        )
        for row in rows
    ]
