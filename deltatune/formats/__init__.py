"""Adapter files <-> the neutral ``{module path: {role: tensor}}`` description.

``peft.py`` holds PEFT's names (config keys, tensor keys by role), ``native.py`` deltatune's own
format for methods PEFT lacks, ``files.py`` the directories both use, ``atomic.py`` crash-safe writes.
"""
