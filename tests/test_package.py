import subprocess
import sys


def test_import_is_cheap():
    """Importing diffrt must not import Triton or model code (nothing runs at import)."""
    code = "import sys, diffrt; assert 'triton' not in sys.modules, 'triton imported'; print(diffrt.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"
