"""Ordinary notebook cells that must run unchanged under ``restricted``.

They run in order in one session (later cells use earlier results), once
under ``trusted`` and once under ``restricted``; outputs must match.  The
``files`` capability is granted in both, over a root holding ``data.csv``.
"""

CELLS = [
    "x = 21 * 2\nx",
    "squares = [i * i for i in range(10)]\nsquares",
    "evens = {i for i in range(20) if i % 2 == 0}\nsorted(evens)",
    "lookup = {k: len(k) for k in ['alpha', 'beta', 'gamma']}\nlookup",
    "gen = (i * 2 for i in range(5))\nsum(gen)",
    "name = 'world'\nf'hello {name}!'",
    "value = 3.14159\nf'{value:.2f} {value!r} {x:>5}'",
    "'{} + {} = {}'.format(1, 2, 3)",
    "'{0:.3f}'.format(2 / 3)",
    "'%s has %d items' % ('list', 3)",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"
    "    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n"
    "    def __add__(self, other):\n        return Point(self.x + other.x, self.y + other.y)\n"
    "Point(1, 2) + Point(3, 4)",
    "class Counter:\n    def __init__(self):\n        self._count = 0\n"
    "    def bump(self):\n        self._count += 1\n        return self._count\n"
    "c = Counter()\nc.bump(); c.bump()",
    "class Base:\n    def greet(self):\n        return 'base'\n"
    "class Child(Base):\n    def greet(self):\n        return 'child+' + super().greet()\n"
    "Child().greet()",
    "class Temp:\n    def __init__(self, c):\n        self._c = c\n    @property\n"
    "    def fahrenheit(self):\n        return self._c * 9 / 5 + 32\nTemp(100).fahrenheit",
    "from dataclasses import dataclass, field\n@dataclass\nclass Item:\n    name: str\n"
    "    price: float\n    tags: list = field(default_factory=list)\n"
    "Item('pen', 1.5)",
    "from dataclasses import asdict\nasdict(Item('cup', 3.0, ['kitchen']))",
    "from collections import namedtuple\nPair = namedtuple('Pair', 'a b')\n"
    "p = Pair(1, 2)\np._asdict(), p._replace(a=5)",
    "from collections import Counter, defaultdict, deque\n"
    "Counter('mississippi').most_common(2)",
    "d = defaultdict(list)\nfor word in ['apple', 'avocado', 'banana']:\n"
    "    d[word[0]].append(word)\ndict(d)",
    "q = deque([1, 2, 3], maxlen=3)\nq.append(4)\nlist(q)",
    "import math\nmath.sqrt(16) + math.pi.__round__(2)",
    "import math\n[round(math.sin(i), 3) for i in range(4)]",
    "import statistics\nstatistics.mean([1, 2, 3, 4]), statistics.median([5, 1, 3])",
    "import json\njson.dumps({'a': [1, 2, {'b': None}]}, sort_keys=True)",
    "json.loads('{\"k\": [1, 2.5, true]}')",
    "import re\nre.findall(r'\\d+', 'a1b22c333')",
    "pattern = re.compile(r'(\\w+)@(\\w+)\\.com')\npattern.match('me@example.com').groups()",
    "import datetime\ndatetime.date(2024, 2, 29) + datetime.timedelta(days=1)",
    "import itertools\nlist(itertools.islice(itertools.count(10, 5), 4))",
    "list(itertools.combinations('abc', 2))",
    "import functools\n@functools.lru_cache(maxsize=None)\ndef fib(n):\n"
    "    return n if n < 2 else fib(n - 1) + fib(n - 2)\nfib(30)",
    "functools.reduce(lambda a, b: a * b, range(1, 8))",
    "import random\nrandom.seed(7)\nrandom.randint(1, 100), random.choice('xyz')",
    "from fractions import Fraction\nFraction(1, 3) + Fraction(1, 6)",
    "from decimal import Decimal\nDecimal('0.1') + Decimal('0.2')",
    "from enum import Enum\nclass Color(Enum):\n    RED = 1\n    GREEN = 2\nColor.RED.name, Color(2)",
    "from typing import Optional, List\ndef first(xs: List[int]) -> Optional[int]:\n"
    "    return xs[0] if xs else None\nfirst([]), first([3])",
    "import asyncio\nasync def work(n):\n    await asyncio.sleep(0)\n    return n * 2\n"
    "await asyncio.gather(work(1), work(2))",
    "async def agen():\n    for i in range(3):\n        yield i\n[i async for i in agen()]",
    "def divide(a, b):\n    return a / b\ndivide(1, 0)",
    "try:\n    int('nope')\nexcept ValueError as exc:\n    message = str(exc)\nmessage",
    "raise KeyError('missing')",
    "total = 0\nfor i in range(1000):\n    total += i\ntotal",
    "while x > 40:\n    x -= 1\nx",
    "match Point(0, 5):\n    case Point(x=0, y=y):\n        where = f'on y axis at {y}'\n    case _:\n"
    "        where = 'elsewhere'\nwhere",
    "lam = lambda a, *rest, k=1, **kw: (a, rest, k, kw)\nlam(1, 2, 3, k=4, z=5)",
    "nums = [5, 3, 9, 1]\nsorted(nums, key=lambda n: -n), max(nums), min(nums)",
    "print('printed', 1, 2, sep='-')",
    "files.list()",
    "files.read('data.csv').splitlines()[1:]",
    "rows = [line.split(',') for line in files.read('data.csv').splitlines()[1:]]\n"
    "sum(int(v) for _, v in rows)",
    "files.write('out/report.txt', 'total=6') if files.exists('out') else "
    "(files.mkdir('out'), files.write('out/report.txt', 'total=6'))\nfiles.read('out/report.txt')",
    "import textwrap\ntextwrap.fill('a ' * 30, width=20).count('\\n')",
    "import string\nstring.ascii_lowercase[:5], string.Template('$who').substitute(who='you')",
    "import copy\norig = {'a': [1, 2]}\nclone = copy.deepcopy(orig)\nclone['a'].append(3)\norig, clone",
    "import heapq\nheapq.nsmallest(2, [7, 3, 5, 1])",
    "type(3).__name__, isinstance(3, int), hasattr([], 'append')",
    "getattr(Point(1, 2), 'x'), setattr(c, 'label', 'ok') or c.label",
    "assert len(squares) == 10\n'ok'",
    "_ + '!'",
    "import hashlib\nhashlib.sha256(b'abc').hexdigest()[:12]",
    "import time\nstart = time.perf_counter()\nelapsed = time.perf_counter() - start\nelapsed >= 0",
    "from contextlib import suppress\nwith suppress(ZeroDivisionError):\n    1 / 0\n'suppressed'",
    "def outer():\n    n = 0\n    def inner():\n        nonlocal n\n        n += 1\n        return n\n"
    "    return inner\ninc = outer()\ninc(); inc()",
    "global_counter = 0\ndef bump():\n    global global_counter\n    global_counter += 1\n"
    "bump(); global_counter",
    "%time y = sum(range(100))",
    "y",
    "display({'shown': True})",
    "len(In) > 0, isinstance(Out, dict)",
    # private state the usual ways: another object's (sorting), the class's
    # own registry, and a dataclass field; the last one's repr shows the
    # session spelling under restricted, `Acc(_total·=5)` (docs/security.md)
    "class Key:\n    def __init__(self, k):\n        self._k = k\n"
    "    def __lt__(self, other):\n        return self._k < other._k\n"
    "[k._k for k in sorted(Key(v) for v in [3, 1, 2])]",
    "class Registry:\n    _items = []\n    @classmethod\n    def add(cls, item):\n"
    "        cls._items.append(item)\n        return len(cls._items)\n"
    "Registry.add('a'), Registry.add('b'), Registry._items",
    "@dataclass\nclass Acc:\n    _total: int = 0\n    def add(self, v):\n"
    "        self._total += v\n        return self\nAcc().add(5)",
    # everyday modules the allowlist review added (docs/security.md), and help()
    "help(len)",
    "import warnings\nwarnings.warn('rounding applied')\n'warned'",
    "import csv, io\nbuf = io.StringIO()\nw = csv.writer(buf)\nw.writerow(['a', 1])\n"
    "w.writerow(['b', 2])\nlist(csv.reader(io.StringIO(buf.getvalue())))",
    "from dataclasses import dataclass\n@dataclass\nclass Pt:\n    x: int\n    y: int\n"
    "match Pt(1, 2):\n    case Pt(0, y):\n        at = ('y axis', y)\n"
    "    case Pt(x, y):\n        at = ('point', x, y)\nat",
]
