"""Unit tests of the HTTP delivery services (admission, scripts, health) and helpers."""
