"""etcjax."""
