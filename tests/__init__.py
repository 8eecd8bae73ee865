"""The test suite: one folder per area of the code (tests/<area>/test_<module>.py); fixtures in tests/fixtures/."""
