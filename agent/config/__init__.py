"""Configuration: every option (``settings``), the user's config file (``file``), personas."""
