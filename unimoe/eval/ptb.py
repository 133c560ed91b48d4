"""Stanford's PTBTokenizer as coco-caption runs it, in Python (CoreNLP 3.4.1, v3.4.1 tag
bdb70c3, `PTBLexer.flex`; coco-caption's call: `-preserveLines -lowerCase`, default options).

The lexer is JFlex: at each position every rule is tried and the longest match wins (its trailing
context `a/b` counted), the earlier rule on a tie; a rule's action may change the text or push
characters back. `tokenize_lines` does the same with one Python regex per rule (alternations whose
first-found match could be shorter than their longest are split into consecutive rules). The
scanner is caseless for literals but not for character classes, hence `(?i:...)` on literals only.
Known differences (docs/design.md, "Benchmarks and scoring"): letters and digits follow Python's
Unicode tables, not JFlex 1.4.3's (Unicode 4.0 era); characters beyond U+FFFF (emoji), which
Java sees as two untokenizable surrogates, are dropped all the same; line breaks inside a
caption (`tokenize_lines`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

# An action maps the matched token text to (output token or None, characters consumed).
Action = Callable[[str], tuple[str | None, int]]


def _class_of(predicate: Callable[[str], bool]) -> str:
    """The Basic Multilingual Plane characters satisfying `predicate`, as a regex class body."""
    ranges, start, prev = [], None, None
    for cp in [*range(0xD800), *range(0xE000, 0x10000), None]:
        if cp is not None and predicate(chr(cp)):
            if start is None or cp != prev + 1:
                if start is not None:
                    ranges.append((start, prev))
                start = cp
            prev = cp
    if start is not None:
        ranges.append((start, prev))
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


# JFlex's [:letter:] (Java's Character.isLetter: the L* categories, as str.isalpha) and
# [:digit:] (Nd). The lexer's LETTER adds soft hyphen, combining marks and some later letters.
ALPHA = _class_of(str.isalpha)
DIG = _class_of(lambda c: c.isdecimal())
UPPER = _class_of(str.isupper)
_LETTER_EXTRA = (
    r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D"
    r"\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525"
    r"\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F"
    r"\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F"
    r"\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955"
    r"\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3"
    r"\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2"
    r"\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48"
    r"\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD"
)
LETTER = rf"(?:[{ALPHA}{_LETTER_EXTRA}]|&[aeiouAEIOU](?i:acute|grave|uml);)"
ALNUM = rf"(?:{LETTER}|[{DIG}])"
SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
NEWLINE = r"(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
SPACENL = rf"(?:{SPACE}|{NEWLINE})"
_NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
SGML = (
    rf"<(?:[!?][A-Za-z\-][^>\r\n]*|{_NAME}(?:[ ]+(?:{_NAME}[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")"
    rf"|{_NAME}))*[ ]*/?|/{_NAME})[ ]*>"
)
NUM = rf"(?:[{DIG}]*(?:[.:,\u00AD\u066B\u066C][{DIG}]+)+|[{DIG}]+)"
WORD = rf"{LETTER}{ALNUM}*(?:[.!?]{LETTER}{ALNUM}*)*"
APOS = r"(?:['\u0092\u2019]|&(?i:apos);)"
APOSETC = rf"(?:{APOS}|[`\u0091\u2018\u201B])"
REDAUX = rf"{APOS}(?:[msdMSD]|(?i:re|ve|ll))"
SREDAUX = rf"(?i:n){APOSETC}(?i:t)"
HYPHEN = r"[\-_\u058A\u2010\u2011]"
_THING_PART = rf"(?:[dDoOlL]{APOSETC}[{ALPHA}{DIG}])?[{ALPHA}{DIG}]+"
THING = rf"{_THING_PART}(?:{HYPHEN}{_THING_PART})*"
THINGA = r"[A-Z]+(?:(?:[+&]|&(?i:amp);)[A-Z]+)+"
ACROS = (  # ACRO's alternatives; ACRO2 needs a dot in the first
    r"[A-Za-z](?:\.[A-Za-z])*",
    r"(?i:Canada|Sino|Korean|EU|Japan|non)-(?i:U\.S)",
    r"(?i:U\.S\.-U\.S\.S\.R|U\.S\.-U\.K)",
)
ACRO2 = "|".join([r"[A-Za-z](?:\.[A-Za-z])+", *ACROS[1:]])
HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:(?:{ACRO2})\.|[A-Za-z0-9\u00AD]+))+"
INSENTP = r"[,;:\u3001]"
# Abbreviation lists; a bracketed capital upstream ("[M]ass") is case-sensitive, the rest not.
ABBREV1 = (
    r"(?:(?i:Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec|Mon|Tues|Tue|Wed|Thurs|Thu|Fri"
    r"|Ala|Ariz|Calif|Colo|Conn|Ct|Dak|Fla|Ga|Ind|Kans?|Ky|Md|Mich|Minn|Mo|Mont|Neb|Nev|Okla"
    r"|Penn|Tenn|Va|Vt|Wisc?|Wyo|Inc|Cos?|Corp|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"
    r"|tel|est|ext|sq|Jr|Sr|Bros|Ed\.D|Ph\.D|Blvd|Rd|Esq|etc|al|seq|Bldg)"
    r"|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)"
    r"|(?i:Pp?t)[ye](?i:s)?)\."
)
ABBREV4_WORDS = (
    r"(?:(?i:Mrs|Mr|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt"
    r"|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst"
    r"|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|Invt|Elec|Natl"
    r"|Dept)|M(?i:iss)|(?i:M)[ft](?i:g))"
)
_SENTENCE_STARTS = (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last "
    "Many More Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There "
    "These They This We When While What Yet You"
).split()
SENTENCE_START = "|".join(
    w[0] + "(?i:" + re.escape(w[1:]) + ")" if len(w) > 1 else w[0]
    for w in sorted(_SENTENCE_STARTS, key=len, reverse=True)
)
_FILE_EXTS = (
    "bat bmp c class cgi cpp dll doc docx exe gif gz h htm html jar java jpeg jpg mov mp3 pdf php"
    " pl png ppt ps py sql tar txt wav x xml zip"
).split()
FILENAME = (
    rf"{ALNUM}+(?:\.{ALNUM}+)*\.(?i:{'|'.join(sorted(_FILE_EXTS, key=len, reverse=True))})"
)
PHONES = (
    r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
    r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}",
    r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
)
_SMILE = r"[\-\^x=~<>']"
ASIAN_SMILEYS = (
    r"[\^x=~<>]\.\[\^(?i:x)=~<>\]",  # as written upstream: a literal ".[^x=~<>]"
    rf"{_SMILE}_{_SMILE}",
    rf"\({_SMILE}[_.]?{_SMILE}\)",
    r"\([\^x=~<>']-[\^x=~<>'`]\)",
)
MISCSYMBOL = (
    r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00BA\u00D7\u00F7\u0387"
    r"\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B\u061E"
    r"\u066A\u066D\u0703-\u070D\u07F6-\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017\u2020-\u2023"
    r"\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F"
    r"\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40"
    r"\uFF5B-\uFF65]"
)


_LINE_BREAKS = re.compile("[\n\r\u2028\u2029\x0b\x0c]")
_SPACES = re.compile(f"{SPACE}+")

# --- Actions ------------------------------------------------------------------------------------


def _keep(tok: str) -> tuple[str | None, int]:
    return tok, len(tok)


def _skip(tok: str) -> tuple[str | None, int]:
    return None, len(tok)


def _as(text: str) -> Action:
    return lambda tok: (text, len(tok))


def _map(fn: Callable[[str], str]) -> Action:
    return lambda tok: (fn(tok), len(tok))


def _push_back(n: int) -> Action:
    """The token without its last `n` characters, which are read again ("cannot" -> can + not)."""
    return lambda tok: (tok[:-n], len(tok) - n)


def _reread_period(tok: str) -> tuple[str | None, int]:
    """"etc." and its final period read again as a token of its own (a sentence end)."""
    return tok, len(tok) - 1


def _acronym_before_sentence(tok: str) -> tuple[str | None, int]:
    """"U.S." before a sentence-starting word: kept, its period read again; "I." -> "I" + "."."""
    return (tok[0], 1) if len(tok) == 2 else (tok, len(tok) - 1)


def _no_soft_hyphens(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00a0")


def _paren_names(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _amp(tok: str) -> str:
    return re.sub(r"(?i:&amp;)", "&", tok)


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$",
             "\u20ac": "$"}  # fmt: skip
_QUOTE_SIDES = (
    (re.compile("[\u0091\u2018\u201b\u2039]"), "`"),
    (re.compile("[\u0092\u2019\u203a]"), "'"),
    (re.compile("[\u0093\u201c\u00ab]"), "``"),
    (re.compile("[\u0094\u201d\u00bb]"), "''"),
)


def _latex_quotes(left: bool) -> Action:
    """PTB's quotes: ' and " become ` and `` when probably opening, else ' and ''."""

    def action(tok: str) -> tuple[str | None, int]:
        out = re.sub("&apos;|'", "`" if left else "'", tok)
        out = re.sub('"|&quot;', "``" if left else "''", out)
        for pattern, replacement in _QUOTE_SIDES:
            out = pattern.sub(replacement, out)
        return out, len(tok)

    return action


def _dashes(tok: str) -> tuple[str | None, int]:
    return ("--" if 3 <= len(tok) <= 4 else tok), len(tok)


# --- Rules, in the lexer's order: (token, trailing context, action) ------------------------------

_q_right, _q_left = _latex_quotes(False), _latex_quotes(True)
_RULES: list[tuple[str, str, Action]] = [
    (r"(?i:c)\+\+", "", _keep),
    (r"(?i:c|f)#", "", _keep),
    (r"(?i:cannot)", "", _push_back(3)),
    (r"(?i:'twas)", "", _push_back(3)),
    (r"(?i:'tis)", "", _push_back(2)),
    (r"(?i:gonna|gotta|lemme|gimme|wanna)", "", _push_back(2)),
    (SGML, "", _map(_nbsp)),
    (r"&(?i:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", "", _as("--")),
    (r"&(?i:amp);", "", _as("&")),
    (r"&(?:(?i:HT|TL|UR|LR|QC|QL|QR|odq|cdq)|#[0-9]+);", "", _keep),
    (WORD, REDAUX, _map(_no_soft_hyphens)),
    (r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*", SREDAUX, _map(_no_soft_hyphens)),
    (WORD, "", _map(_no_soft_hyphens)),
    # APOWORD: words with an apostrophe inside ("o'clock", "'90s", "rock'n'roll" pieces).
    (rf"{APOS}(?i:n){APOS}?", "", _keep),
    (rf"[lLdDjJ]{APOS}", "", _keep),
    (rf"(?i:Dunkin|somethin|ol){APOS}", "", _keep),
    (rf"{APOS}(?i:em)", "", _keep),
    (rf"[A-HJ-XZn]{APOSETC}[{ALPHA}]{{2,}}", "", _keep),
    (rf"{APOS}[2-9]0(?i:s)", "", _keep),
    (rf"{APOS}(?i:till?)", "", _keep),
    (rf"[{ALPHA}]+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z][{ALPHA}]*", "", _keep),
    (rf"{APOS}(?i:cause)|(?i:cont'd)\.?", "", _keep),
    (r"(?i:'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", "", _keep),
    (rf"(?i:o){APOSETC}(?i:o)", "", _keep),
    (rf"(?i:y){APOS}", f"[{ALPHA}]", _keep),
    (r"(?i:https?://)[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},\-]", "", _keep),
    # LIKELYURL; `,-_` is a range upstream too (it leaves out digits and capitals).
    (r"(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
     r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?", "", _keep),
    (r"(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)"
     r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?", "", _keep),
    (r"(?:&(?i:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@"
     r"(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&(?i:gt);|>)?",
     "", _keep),
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+", "", _keep),
    (REDAUX, "[^A-Za-z]", _q_right),
    (SREDAUX, "[^A-Za-z]", _q_right),
    (rf"[{DIG}]{{1,2}}[\-/][{DIG}]{{1,2}}[\-/][{DIG}]{{2,4}}", "", _keep),
    (rf"[\-+]?{NUM}", "", _map(_no_soft_hyphens)),
    (r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",
     "", _keep),
    (rf"(?:[{DIG}]{{1,4}}[\- \u00A0])?[{DIG}]{{1,4}}(?:\\?/|\u2044)[{DIG}]{{1,4}}", "",
     _map(_nbsp)),
    (r"[\u00BC\u00BD\u00BE\u2153-\u215E]", "", _map(lambda t: _FRACTIONS.get(t, t))),
    (rf"-(?i:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:C\.D\.s|pro-|anti-)|(?i:S)(?:&|&(?i:amp);)(?i:P-500|Ls)"
     rf"|(?i:Cap){APOS}(?i:n)|(?i:c){APOS}(?i:est)", "", _map(_amp)),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", "", _keep),
    (r"[A-Z]*\$|#", "", _keep),
    (r"[\u00A2-\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]", "",
     _map(lambda t: _CURRENCY.get(t, t))),
    *[(rf"(?:{acro})\.", rf"{SPACENL}+(?:{SENTENCE_START}|{SGML}){SPACENL}",
       _acronym_before_sentence) for acro in ACROS],
    (r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\.", rf"{SPACENL}?[{DIG}]", _keep),
    (r"(?:(?i:pt)[eyEY]|(?i:co))\.", rf"{SPACE}(?i:ltd|lim)", _keep),
    # ABBREV1 ("etc."): at a sentence end or the end of the text its period is read again.
    (ABBREV1, rf"{SPACENL}(?:{SPACENL}|[{UPPER}]|{SGML})", _reread_period),
    (ABBREV1, r"[\s\S]{2}", _keep),
    (ABBREV1, "", _reread_period),
    *[(rf"(?:{words})\.", "", _keep) for words in (ABBREV4_WORDS, *ACROS)],
    *[(words, SPACE, _keep) for words in (ABBREV4_WORDS, *ACROS)],
    *[(acro, SPACENL, _keep) for acro in ACROS],
    (rf"{APOS}[0-9][0-9]", SPACENL, _keep),
    (FILENAME, rf"(?:{SPACENL}|[.?!,])", _keep),
    (rf"{WORD}\.", INSENTP, _map(_no_soft_hyphens)),
    *[(phone, "", _map(lambda t: _paren_names(_nbsp(t)))) for phone in PHONES],
    (r'"|&(?i:quot);', r"[A-Za-z0-9$]", _q_left),
    (r'"|&(?i:quot);', "", _q_right),
    (r"\x7f", "", _skip),
    (r"<|&(?i:lt);", "", _as("<")),
    (r">|&(?i:gt);", "", _as(">")),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", "[^A-Za-z0-9]", _map(_paren_names)),
    *[(smiley, "", _map(_paren_names)) for smiley in ASIAN_SMILEYS],
    (r"\{", "", _as("-LCB-")),
    (r"\}", "", _as("-RCB-")),
    (r"\[", "", _as("-LSB-")),
    (r"\]", "", _as("-RSB-")),
    (r"\(", "", _as("-LRB-")),
    (r"\)", "", _as("-RRB-")),
    (r"-+", "", _dashes),
    (r"\.{3,5}", "", _as("...")),
    (r"(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", "", _as("...")),
    (r"@+|#+|_+", "", _keep),
    (r"\*+|(?:\\\*){1,3}", "", _keep),
    (INSENTP, "", _keep),
    (r"[?!]+", "", _keep),
    (r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", "", _keep),
    (r"=", "", _keep),
    (r"/", "", _keep),
    (rf"{HTHING}\.", INSENTP, _map(_no_soft_hyphens)),
    (HTHING, "", _map(_no_soft_hyphens)),
    (rf"{THING}\.", INSENTP, _keep),
    (THING, "", _keep),
    (rf"{THINGA}\.", INSENTP, _map(_amp)),
    (THINGA, "", _map(_amp)),
    (r"'", r"[A-Za-z][^ \t\n\r\u00A0]", _q_left),
    (REDAUX, "", _q_right),
    (SREDAUX, "", _q_right),
    (r"''", "", _q_right),
    (r"[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091-\u0094\u201E\u201F\u2039\u203A"
     r"\u00AB\u00BB]{1,2}", "", _q_right),
    (APOS, "", _q_right),
    (r"<<|>>", "", _keep),
    (MISCSYMBOL, "", _keep),
    (rf"\x00|{SPACE}+|[\u200B\u200E\u200F\uFEFF]", "", _skip),
    (NEWLINE, "", _as("\n")),
    (r"&(?i:nbsp);", "", _skip),
    (r"[^\n]", "", _skip),  # untokenizable: dropped, as upstream by default
]  # fmt: skip


@functools.cache
def _compiled() -> list[tuple[re.Pattern[str], Action]]:
    return [(re.compile(f"(?P<t>{tok}){trail}"), action) for tok, trail, action in _RULES]


def _next_token(text: str, pos: int) -> tuple[str | None, int]:
    """(token or None, characters consumed) of the longest rule match at `pos`."""
    best, best_len = None, 0
    for pattern, action in _compiled():
        match = pattern.match(text, pos)
        if match is not None and match.end() - pos > best_len:
            best, best_len = (match.group("t"), action), match.end() - pos
    if best is None or not best[0]:  # the last rule matches any character but a line break
        raise AssertionError(f"ptb: no rule matches {text[pos:pos + 20]!r}")
    return best[1](best[0])


def tokenize_lines(lines: Sequence[str]) -> list[list[str]]:
    """PTB tokens, before lowercasing, of each line: ['A dog (big)'] -> [['A', 'dog', '-LRB-',
    'big', '-RRB-']].

    The lines are read as one text, as coco-caption writes its captions to one file, so a rule's
    trailing context sees the start of the next line ("... vitamin A." + "The ..." -> "A", ".").
    A line break inside a caption becomes a space: coco-caption replaces "\\n" so, and would
    misalign every later caption at the others (carriage return, form feed, U+2028, U+2029).
    """
    if not lines:
        return []
    text = "\n".join(_LINE_BREAKS.sub(" ", line) for line in lines)
    out: list[list[str]] = [[]]
    pos = 0
    while pos < len(text):
        spaces = _SPACES.match(text, pos)  # no other rule starts with a space: skip them fast
        if spaces is not None:
            pos = spaces.end()
            continue
        token, consumed = _next_token(text, pos)
        if token == "\n":
            out.append([])
        elif token is not None:
            out[-1].append(token)
        pos += consumed
    return out
