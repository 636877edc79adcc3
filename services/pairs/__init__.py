"""The pair builder: joins descriptions with their scores and decides one preference pair per region."""
