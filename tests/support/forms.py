"""Read an HTML form's fields and defaults, as a browser would submit them."""

from __future__ import annotations

from html.parser import HTMLParser


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[dict[str, object]] = []
        self._select: str | None = None
        self._select_first: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {key: value or "" for key, value in attrs}
        if tag == "form":
            self.forms.append({"action": values.get("action", ""),
                               "method": values.get("method", "get").lower(),
                               "fields": {}})
            return
        if not self.forms:
            return
        fields: dict[str, str] = self.forms[-1]["fields"]  # type: ignore[assignment]
        name = values.get("name")
        if tag == "input" and name:
            kind = values.get("type", "text").lower()
            if kind in {"checkbox", "radio"} and "checked" not in values:
                return
            if kind in {"submit", "button"}:
                return
            fields[name] = values.get("value", "")
        elif tag == "select" and name:
            self._select, self._select_first = name, None
        elif tag == "option" and self._select:
            value = values.get("value", "")
            if self._select_first is None:
                self._select_first = value
                fields[self._select] = value
            if "selected" in values:
                fields[self._select] = value
        elif tag == "textarea" and name:
            self._textarea = name
            fields[name] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._textarea and self.forms:
            fields: dict[str, str] = self.forms[-1]["fields"]  # type: ignore
            fields[self._textarea] += data


def form_fields(html: str, containing: str = "csrf_token") -> dict[str, str]:
    """Return the fields of the first form that has a field named ``containing``."""
    parser = _FormParser()
    parser.feed(html)
    for form in parser.forms:
        fields: dict[str, str] = form["fields"]  # type: ignore[assignment]
        if containing in fields and len(fields) > 1:
            return dict(fields)
    for form in parser.forms:
        fields = form["fields"]  # type: ignore[assignment]
        if containing in fields:
            return dict(fields)
    raise AssertionError(f"no form with a {containing!r} field in the page")
