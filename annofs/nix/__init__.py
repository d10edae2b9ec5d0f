"""Nix interoperability: NAR archives, Nix's base32, narinfo files and binary caches."""
