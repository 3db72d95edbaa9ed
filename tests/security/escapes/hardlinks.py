"""Class 7: the files capability and hard links planted by someone else.

The corpus runner links the canary file into the root (``links``) before the
cell runs: a hard link is not a symlink, ``O_NOFOLLOW`` does not see it.
"""

PAYLOADS = [
    ("hardlink_read", "hard_links", "read_file",
     "pwned = files.read('notes.txt')", (3, 0), {"aims_at": "capability", "links": ["notes.txt"]}),
    ("hardlink_nested", "hard_links", "read_file",
     "pwned = files.read('sub/dir/data.txt')", (3, 0),
     {"aims_at": "capability", "links": ["sub/dir/data.txt"]}),
    ("hardlink_listed_then_read", "hard_links", "read_file",
     "pwned = ''.join(files.read(n) for n in files.list('.') if n.endswith('.csv'))",
     (3, 0), {"aims_at": "capability", "links": ["export.csv"]}),
]
