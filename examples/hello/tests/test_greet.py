import subprocess
import unittest


class GreetTest(unittest.TestCase):
    def test_default(self) -> None:
        out = subprocess.run(["./build/greet"], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout, "hello, world\n")

    def test_name(self) -> None:
        out = subprocess.run(["./build/greet", "vm"], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout, "hello, vm\n")


if __name__ == "__main__":
    unittest.main()
