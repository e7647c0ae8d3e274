from tests.service.conftest import server  # noqa: F401  (the live server fixture)
