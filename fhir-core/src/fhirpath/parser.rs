//! Lexer and precedence-climbing parser producing the compiled tree [`Ex`].

use super::FhirPathError;

/// Nesting deeper than this is rejected, so a hostile custom SearchParameter cannot overflow the
/// stack (the official expressions nest at most 4 deep).
const MAX_DEPTH: usize = 64;

/// A compiled expression node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ex {
    /// `{}`
    Empty,
    /// A string literal (also `%ucum` and friends).
    Str(String),
    /// `true` / `false`
    Bool(bool),
    /// An integer literal.
    Int(i64),
    /// A decimal literal, as written.
    Dec(String),
    /// `$this`
    This,
    /// `%resource` / `%rootResource`
    Resource,
    /// `%context`
    Context,
    /// A leading capitalised identifier (`Observation.code`): the focus if it is of that type.
    TypeRoot(String),
    /// A focus followed by member accesses, indexers and function calls.
    Path(Box<Ex>, Vec<Step>),
    /// `a | b | c`, flattened.
    Union(Vec<Ex>),
    /// A binary operator.
    Bin(BinOp, Box<Ex>, Box<Ex>),
    /// `x is T`
    Is(Box<Ex>, String),
    /// `x as T`
    As(Box<Ex>, String),
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Member(String),
    Index(usize),
    Where(Ex),
    Select(Ex),
    Exists(Option<Ex>),
    All(Ex),
    Empty,
    Not,
    First,
    Last,
    Tail,
    Skip(usize),
    Take(usize),
    Count,
    Distinct,
    OfType(String),
    As(String),
    Is(String),
    Resolve,
    Extension(String),
    HasValue,
}

/// Binary operators other than `|`, `is` and `as`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// A backtick-delimited identifier: never a keyword, never a type root.
    Quoted(String),
    Str(String),
    Int(i64),
    Dec(String),
    Const(String),
    This,
    Sym(&'static str),
    End,
}

struct Lexer<'s> {
    src: &'s str,
    pos: usize,
}

fn syntax(pos: usize, message: impl Into<String>) -> FhirPathError {
    FhirPathError::Syntax {
        pos,
        message: message.into(),
    }
}

fn unsupported(pos: usize, what: impl Into<String>) -> FhirPathError {
    FhirPathError::Unsupported {
        pos,
        what: what.into(),
    }
}

impl Lexer<'_> {
    fn bytes(&self) -> &[u8] {
        self.src.as_bytes()
    }

    fn skip_ws(&mut self) -> Result<(), FhirPathError> {
        loop {
            match self.bytes().get(self.pos) {
                Some(b' ' | b'\t' | b'\r' | b'\n') => self.pos += 1,
                Some(b'/') if self.bytes().get(self.pos + 1) == Some(&b'/') => {
                    while !matches!(self.bytes().get(self.pos), None | Some(b'\n')) {
                        self.pos += 1;
                    }
                }
                Some(b'/') if self.bytes().get(self.pos + 1) == Some(&b'*') => {
                    let start = self.pos;
                    let rest = &self.src[self.pos + 2..];
                    let end = rest
                        .find("*/")
                        .ok_or_else(|| syntax(start, "unterminated comment"))?;
                    self.pos += 2 + end + 2;
                }
                _ => return Ok(()),
            }
        }
    }

    /// The next token and where it starts.
    fn next(&mut self) -> Result<(usize, Tok), FhirPathError> {
        self.skip_ws()?;
        let start = self.pos;
        let Some(&c) = self.bytes().get(self.pos) else {
            return Ok((start, Tok::End));
        };
        let tok = match c {
            b'\'' => Tok::Str(self.quoted(b'\'')?),
            b'`' => Tok::Quoted(self.quoted(b'`')?),
            b'0'..=b'9' => self.number()?,
            b'$' => {
                self.pos += 1;
                let name = self.ident_text();
                match name {
                    "this" => Tok::This,
                    other => return Err(unsupported(start, format!("${other}"))),
                }
            }
            b'%' => {
                self.pos += 1;
                let name = match self.bytes().get(self.pos) {
                    Some(b'`') => self.quoted(b'`')?,
                    Some(b'\'') => self.quoted(b'\'')?,
                    _ => self.ident_text().to_string(),
                };
                if name.is_empty() {
                    return Err(syntax(start, "a name must follow '%'"));
                }
                Tok::Const(name)
            }
            b'@' => return Err(unsupported(start, "date/time literals")),
            c if c.is_ascii_alphabetic() || c == b'_' => Tok::Ident(self.ident_text().to_string()),
            _ => {
                const SYMS: [&str; 20] = [
                    "!=", "!~", "<=", ">=", "=", "~", "<", ">", "|", "+", "-", "*", "/", "&", ".",
                    "(", ")", "[", "]", ",",
                ];
                const BRACES: [&str; 2] = ["{", "}"];
                let rest = &self.src[self.pos..];
                let Some(sym) = SYMS
                    .iter()
                    .chain(BRACES.iter())
                    .find(|s| rest.starts_with(**s))
                else {
                    let ch = rest.chars().next().unwrap_or('?');
                    return Err(syntax(start, format!("unexpected character '{ch}'")));
                };
                self.pos += sym.len();
                Tok::Sym(sym)
            }
        };
        Ok((start, tok))
    }

    fn ident_text(&mut self) -> &str {
        let start = self.pos;
        while matches!(self.bytes().get(self.pos), Some(c) if c.is_ascii_alphanumeric() || *c == b'_')
        {
            self.pos += 1;
        }
        &self.src[start..self.pos]
    }

    fn quoted(&mut self, quote: u8) -> Result<String, FhirPathError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let rest = &self.src[self.pos..];
            let Some(c) = rest.chars().next() else {
                return Err(syntax(start, "unterminated string or identifier"));
            };
            self.pos += c.len_utf8();
            match c {
                c if c as u32 == quote as u32 => return Ok(out),
                '\\' => {
                    let Some(e) = self.src[self.pos..].chars().next() else {
                        return Err(syntax(start, "unterminated escape"));
                    };
                    self.pos += e.len_utf8();
                    match e {
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'f' => out.push('\u{c}'),
                        'u' => {
                            let hex = self
                                .src
                                .get(self.pos..self.pos + 4)
                                .ok_or_else(|| syntax(self.pos, "short \\u escape"))?;
                            let cp = u32::from_str_radix(hex, 16)
                                .ok()
                                .and_then(char::from_u32)
                                .ok_or_else(|| syntax(self.pos, "invalid \\u escape"))?;
                            out.push(cp);
                            self.pos += 4;
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn number(&mut self) -> Result<Tok, FhirPathError> {
        let start = self.pos;
        while matches!(self.bytes().get(self.pos), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        // `1.x` would be an invocation on 1; only a digit after the dot makes a decimal.
        if self.bytes().get(self.pos) == Some(&b'.')
            && matches!(self.bytes().get(self.pos + 1), Some(b'0'..=b'9'))
        {
            self.pos += 1;
            while matches!(self.bytes().get(self.pos), Some(b'0'..=b'9')) {
                self.pos += 1;
            }
            return Ok(Tok::Dec(self.src[start..self.pos].to_string()));
        }
        let text = &self.src[start..self.pos];
        text.parse::<i64>()
            .map(Tok::Int)
            .map_err(|_| syntax(start, "integer literal out of range"))
    }
}

pub(crate) struct Parser<'s> {
    lexer: Lexer<'s>,
    tok: Tok,
    tok_pos: usize,
    depth: usize,
}

/// Binding power of a binary operator token (higher binds tighter), per the FHIRPath spec.
fn binary_power(tok: &Tok) -> Option<u8> {
    Some(match tok {
        Tok::Ident(w) => match w.as_str() {
            "implies" => 1,
            "or" | "xor" => 2,
            "and" => 3,
            "in" | "contains" => 4,
            "is" | "as" => 8,
            "div" | "mod" => 10,
            _ => return None,
        },
        Tok::Sym(s) => match *s {
            "=" | "~" | "!=" | "!~" => 5,
            "<" | ">" | "<=" | ">=" => 6,
            "|" => 7,
            "+" | "-" | "&" => 9,
            "*" | "/" => 10,
            _ => return None,
        },
        _ => return None,
    })
}

impl<'s> Parser<'s> {
    pub(crate) fn parse(src: &'s str) -> Result<Ex, FhirPathError> {
        let mut lexer = Lexer { src, pos: 0 };
        let (tok_pos, tok) = lexer.next()?;
        let mut p = Parser {
            lexer,
            tok,
            tok_pos,
            depth: 0,
        };
        if p.tok == Tok::End {
            return Err(syntax(0, "empty expression"));
        }
        let ex = p.expression(0)?;
        if p.tok != Tok::End {
            return Err(syntax(
                p.tok_pos,
                format!("unexpected {}", describe(&p.tok)),
            ));
        }
        Ok(ex)
    }

    fn advance(&mut self) -> Result<Tok, FhirPathError> {
        let (pos, tok) = self.lexer.next()?;
        self.tok_pos = pos;
        Ok(std::mem::replace(&mut self.tok, tok))
    }

    fn expect(&mut self, sym: &'static str) -> Result<(), FhirPathError> {
        if self.tok == Tok::Sym(sym) {
            self.advance()?;
            Ok(())
        } else {
            Err(syntax(
                self.tok_pos,
                format!("expected '{sym}', found {}", describe(&self.tok)),
            ))
        }
    }

    fn expression(&mut self, min_power: u8) -> Result<Ex, FhirPathError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(syntax(self.tok_pos, "expression nested too deeply"));
        }
        let entry_depth = self.depth;
        let mut lhs = self.unary()?;
        while let Some(power) = binary_power(&self.tok) {
            if power <= min_power {
                break;
            }
            let op_pos = self.tok_pos;
            // A chain `a = b = c …` nests to the left without recursing here, but evaluation
            // recurses into it; unions are flattened and do not nest.
            if self.tok != Tok::Sym("|") {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(syntax(op_pos, "expression nested too deeply"));
                }
            }
            let op = self.advance()?;
            lhs = match op {
                Tok::Ident(w) if w == "is" || w == "as" => {
                    let ty = self.type_specifier()?;
                    if w == "is" {
                        Ex::Is(Box::new(lhs), ty)
                    } else {
                        Ex::As(Box::new(lhs), ty)
                    }
                }
                Tok::Sym("|") => {
                    let rhs = self.expression(power)?;
                    match lhs {
                        Ex::Union(mut items) => {
                            items.push(rhs);
                            Ex::Union(items)
                        }
                        other => Ex::Union(vec![other, rhs]),
                    }
                }
                op => {
                    let bin = match &op {
                        Tok::Sym("=") => BinOp::Eq,
                        Tok::Sym("!=") => BinOp::Ne,
                        Tok::Sym("~") => BinOp::Equiv,
                        Tok::Sym("!~") => BinOp::NotEquiv,
                        Tok::Sym("<") => BinOp::Lt,
                        Tok::Sym("<=") => BinOp::Le,
                        Tok::Sym(">") => BinOp::Gt,
                        Tok::Sym(">=") => BinOp::Ge,
                        Tok::Ident(w) => match w.as_str() {
                            "in" => BinOp::In,
                            "contains" => BinOp::Contains,
                            "and" => BinOp::And,
                            "or" => BinOp::Or,
                            "xor" => BinOp::Xor,
                            "implies" => BinOp::Implies,
                            other => {
                                return Err(unsupported(op_pos, format!("operator '{other}'")));
                            }
                        },
                        Tok::Sym(s) => {
                            return Err(unsupported(op_pos, format!("operator '{s}'")));
                        }
                        other => {
                            return Err(syntax(op_pos, format!("unexpected {}", describe(other))));
                        }
                    };
                    let rhs = self.expression(power)?;
                    Ex::Bin(bin, Box::new(lhs), Box::new(rhs))
                }
            };
        }
        self.depth = entry_depth - 1;
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Ex, FhirPathError> {
        if let Tok::Sym(s @ ("-" | "+")) = self.tok {
            let pos = self.tok_pos;
            self.advance()?;
            let negate = s == "-";
            return match self.advance()? {
                Tok::Int(i) => Ok(Ex::Int(if negate { -i } else { i })),
                Tok::Dec(d) => Ok(Ex::Dec(if negate { format!("-{d}") } else { d })),
                _ => Err(unsupported(pos, "unary sign on a non-literal")),
            };
        }
        let term = self.term()?;
        self.postfix(term)
    }

    fn postfix(&mut self, mut ex: Ex) -> Result<Ex, FhirPathError> {
        loop {
            let step = match self.tok {
                Tok::Sym(".") => {
                    self.advance()?;
                    let pos = self.tok_pos;
                    let name = match self.advance()? {
                        Tok::Ident(n) | Tok::Quoted(n) => n,
                        other => {
                            return Err(syntax(
                                pos,
                                format!("expected a name after '.', found {}", describe(&other)),
                            ));
                        }
                    };
                    if self.tok == Tok::Sym("(") {
                        self.function(&name, pos)?
                    } else {
                        Step::Member(name)
                    }
                }
                Tok::Sym("[") => {
                    let pos = self.tok_pos;
                    self.advance()?;
                    let index = match self.advance()? {
                        Tok::Int(i) => {
                            usize::try_from(i).map_err(|_| syntax(pos, "negative index"))?
                        }
                        _ => {
                            return Err(unsupported(
                                pos,
                                "an indexer other than an integer literal",
                            ));
                        }
                    };
                    self.expect("]")?;
                    Step::Index(index)
                }
                _ => return Ok(ex),
            };
            ex = match ex {
                Ex::Path(head, mut steps) => {
                    steps.push(step);
                    Ex::Path(head, steps)
                }
                other => Ex::Path(Box::new(other), vec![step]),
            };
        }
    }

    fn term(&mut self) -> Result<Ex, FhirPathError> {
        let pos = self.tok_pos;
        match self.advance()? {
            Tok::Str(s) => Ok(Ex::Str(s)),
            Tok::Int(i) => Ok(Ex::Int(i)),
            Tok::Dec(d) => Ok(Ex::Dec(d)),
            Tok::This => Ok(Ex::This),
            Tok::Const(name) => match name.as_str() {
                "resource" | "rootResource" => Ok(Ex::Resource),
                "context" => Ok(Ex::Context),
                "ucum" => Ok(Ex::Str("http://unitsofmeasure.org".into())),
                "sct" => Ok(Ex::Str("http://snomed.info/sct".into())),
                "loinc" => Ok(Ex::Str("http://loinc.org".into())),
                other => Err(unsupported(pos, format!("%{other}"))),
            },
            Tok::Sym("(") => {
                let inner = self.expression(0)?;
                self.expect(")")?;
                Ok(inner)
            }
            Tok::Sym("{") => {
                self.expect("}")?;
                Ok(Ex::Empty)
            }
            Tok::Quoted(name) => Ok(Ex::Path(Box::new(Ex::This), vec![Step::Member(name)])),
            Tok::Ident(name) => {
                if self.tok == Tok::Sym("(") {
                    let step = self.function(&name, pos)?;
                    return Ok(Ex::Path(Box::new(Ex::This), vec![step]));
                }
                match name.as_str() {
                    "true" => Ok(Ex::Bool(true)),
                    "false" => Ok(Ex::Bool(false)),
                    n if n.starts_with(|c: char| c.is_ascii_uppercase()) => Ok(Ex::TypeRoot(name)),
                    _ => Ok(Ex::Path(Box::new(Ex::This), vec![Step::Member(name)])),
                }
            }
            other => Err(syntax(pos, format!("unexpected {}", describe(&other)))),
        }
    }

    /// `Quantity`, `FHIR.Quantity`, `System.String`: the namespace is dropped, because type
    /// tests compare FHIR and System type names leniently (see `eval::type_is`).
    fn type_specifier(&mut self) -> Result<String, FhirPathError> {
        let pos = self.tok_pos;
        let mut name = match self.advance()? {
            Tok::Ident(n) | Tok::Quoted(n) => n,
            other => {
                return Err(syntax(
                    pos,
                    format!("expected a type name, found {}", describe(&other)),
                ));
            }
        };
        if self.tok == Tok::Sym(".") && (name == "FHIR" || name == "System") {
            self.advance()?;
            let pos = self.tok_pos;
            name = match self.advance()? {
                Tok::Ident(n) | Tok::Quoted(n) => n,
                other => {
                    return Err(syntax(
                        pos,
                        format!("expected a type name, found {}", describe(&other)),
                    ));
                }
            };
        }
        Ok(name)
    }

    /// Parses the argument list of function `name` (the current token is `(`).
    fn function(&mut self, name: &str, pos: usize) -> Result<Step, FhirPathError> {
        self.expect("(")?;
        // Type-specifier arguments are names, not expressions (`as(string)` is no member access).
        if matches!(name, "ofType" | "as" | "is") {
            let ty = self.type_specifier()?;
            self.expect(")")?;
            return Ok(match name {
                "ofType" => Step::OfType(ty),
                "as" => Step::As(ty),
                _ => Step::Is(ty),
            });
        }
        let mut args = Vec::new();
        if self.tok != Tok::Sym(")") {
            loop {
                args.push(self.expression(0)?);
                if self.tok == Tok::Sym(",") {
                    self.advance()?;
                } else {
                    break;
                }
            }
        }
        self.expect(")")?;
        let arity = |n: usize| -> Result<(), FhirPathError> {
            if args.len() == n {
                Ok(())
            } else {
                Err(syntax(pos, format!("{name}() takes {n} argument(s)")))
            }
        };
        let int_arg = |args: &[Ex]| -> Result<usize, FhirPathError> {
            match args {
                [Ex::Int(i)] if *i >= 0 => Ok(*i as usize),
                _ => Err(unsupported(
                    pos,
                    format!("{name}() with other than a non-negative integer literal"),
                )),
            }
        };
        let step = match name {
            "where" | "select" | "all" => {
                arity(1)?;
                let arg = args.pop().unwrap_or(Ex::Empty);
                match name {
                    "where" => Step::Where(arg),
                    "select" => Step::Select(arg),
                    _ => Step::All(arg),
                }
            }
            "exists" => {
                if args.len() > 1 {
                    return Err(syntax(pos, "exists() takes at most one argument"));
                }
                Step::Exists(args.pop())
            }
            "skip" => Step::Skip(int_arg(&args)?),
            "take" => Step::Take(int_arg(&args)?),
            "extension" => match args.as_slice() {
                [Ex::Str(url)] => Step::Extension(url.clone()),
                _ => {
                    return Err(unsupported(
                        pos,
                        "extension() with other than a string literal",
                    ));
                }
            },
            _ => {
                let step = match name {
                    "empty" => Step::Empty,
                    "not" => Step::Not,
                    "first" => Step::First,
                    "last" => Step::Last,
                    "tail" => Step::Tail,
                    "count" => Step::Count,
                    "distinct" => Step::Distinct,
                    "resolve" => Step::Resolve,
                    "hasValue" => Step::HasValue,
                    other => return Err(unsupported(pos, format!("function {other}()"))),
                };
                arity(0)?;
                step
            }
        };
        Ok(step)
    }
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(n) => format!("'{n}'"),
        Tok::Quoted(n) => format!("`{n}`"),
        Tok::Str(_) => "a string".into(),
        Tok::Int(_) | Tok::Dec(_) => "a number".into(),
        Tok::Const(n) => format!("%{n}"),
        Tok::This => "$this".into(),
        Tok::Sym(s) => format!("'{s}'"),
        Tok::End => "the end of the expression".into(),
    }
}
