package config

import (
	"errors"
	"sort"
	"strconv"
	"strings"
)

// Error is one problem in a config: where it is and what is wrong. Parse and
// Validate return every problem at once, joined with errors.Join, so
// errors.As finds the first and the message lists them one per line.
type Error struct {
	File   string // "" when unknown (config built in memory)
	Line   int    // 1-based, 0 when unknown
	Column int    // 1-based, 0 when unknown
	Field  string // path such as "listeners[0].health.rise", "" for the whole file
	Msg    string
}

// Error formats as "file:line:column: field: message", leaving out the parts
// that are unknown, so editors and terminals can jump to the spot.
func (e *Error) Error() string {
	var b strings.Builder
	loc := make([]string, 0, 3)
	if e.File != "" {
		loc = append(loc, e.File)
	}
	if e.Line > 0 {
		loc = append(loc, strconv.Itoa(e.Line))
		if e.Column > 0 {
			loc = append(loc, strconv.Itoa(e.Column))
		}
	}
	if len(loc) > 0 {
		b.WriteString(strings.Join(loc, ":"))
		b.WriteString(": ")
	}
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// joinErrors sorts errs by position (unknown positions last, keeping their
// order) and joins them; nil when there are none.
func joinErrors(errs []*Error) error {
	if len(errs) == 0 {
		return nil
	}
	sort.SliceStable(errs, func(i, j int) bool {
		a, b := errs[i], errs[j]
		if (a.Line == 0) != (b.Line == 0) {
			return b.Line == 0
		}
		if a.Line != b.Line {
			return a.Line < b.Line
		}
		return a.Column < b.Column
	})
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = e
	}
	return errors.Join(out...)
}
