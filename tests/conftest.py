"""Test-wide set-up: four fake CPU devices (for --tp tests) before JAX is imported, and
the tiny Hugging Face checkpoint fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

from tests.hf_fixtures import llama3_dir, llama_dir, mistral_dir, qwen2_dir  # noqa: E402,F401
