package health

import (
	"strings"
	"testing"
)

// httpAnswer tells an incomplete answer from a whole one as its bytes
// arrive, and judges it as the goroutine path does.
func TestHTTPAnswerAsItArrives(t *testing.T) {
	s := compile(Config{Check: CheckHTTP, Path: "/healthz", ExpectStatus: []string{"200"}, ExpectBody: "ok"})
	if s.err != nil {
		t.Fatal(s.err)
	}
	const head = "HTTP/1.1 200 OK\r\n"
	for _, tc := range []struct {
		name string
		got  string
		eof  bool
		done bool
		keep bool
		err  string // a substring; "" for none
	}{
		{name: "half a status line", got: "HTTP/1.1 2"},
		{name: "a header without its end", got: head + "Content-Length: 2\r\n"},
		{name: "a header without its end, closed", got: head + "Content-Length: 2\r\n", eof: true, done: true, err: "unexpected EOF"},
		{name: "part of a Content-Length body", got: head + "Content-Length: 10\r\n\r\nok"},
		{name: "a whole Content-Length body", got: head + "Content-Length: 2\r\n\r\nok", done: true, keep: true},
		{name: "a body the server closes after", got: head + "Content-Length: 2\r\nConnection: close\r\n\r\nok", done: true},
		{name: "bytes after the answer", got: head + "Content-Length: 2\r\n\r\nokHTTP/1.1", done: true},
		{name: "part of a chunked body", got: head + "Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"},
		{name: "a whole chunked body", got: head + "Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", done: true, keep: true},
		{name: "a body until close, open", got: head + "\r\nok"},
		{name: "a body until close, closed", got: head + "\r\nok", eof: true, done: true},
		{name: "a part body, closed", got: head + "Content-Length: 10\r\n\r\nok", eof: true, done: true, err: "reading the body: unexpected EOF"},
		{name: "the wrong status, body unread", got: "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\n", done: true, err: "status 503 (want 200)"},
		{name: "the body lacks", got: head + "Content-Length: 2\r\n\r\nno", done: true, err: `body lacked "ok" (got "no")`},
		{name: "a 204 where 200 is wanted", got: "HTTP/1.1 204 No Content\r\n\r\n", done: true, err: "status 204"},
		{name: "not HTTP", got: "SSH-2.0-OpenSSH_9.2\r\n\r\n", done: true, err: "malformed HTTP"},
		{name: "nothing, closed", eof: true, done: true, err: "EOF"},
		{name: "an interim answer, then the final one", got: "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + head + "Content-Length: 2\r\n\r\nok", done: true, keep: true},
		{name: "an interim answer alone", got: "HTTP/1.1 100 Continue\r\n\r\n"},
		{name: "an interim answer and half the final header", got: "HTTP/1.1 100 Continue\r\n\r\n" + head + "Content-Le"},
		{name: "an interim answer, closed", got: "HTTP/1.1 100 Continue\r\n\r\n", eof: true, done: true, err: "EOF"},
		{name: "an interim answer, then the wrong status", got: "HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", done: true, err: "status 503"},
		{name: "too many interim answers", got: strings.Repeat("HTTP/1.1 103 Early Hints\r\n\r\n", 6) + head + "Content-Length: 2\r\n\r\nok", done: true, err: "more than 5 interim (1xx) answers"},
		{name: "101 is final", got: "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n", done: true, err: "status 101"},
	} {
		var ar answerReader
		done, keep, err := s.httpAnswer([]byte(tc.got), tc.eof, &ar)
		if done != tc.done || keep != tc.keep {
			t.Errorf("%s: done %v keep %v, want %v %v (err %v)", tc.name, done, keep, tc.done, tc.keep, err)
		}
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%s: error %v, want one with %q", tc.name, err, tc.err)
		}
	}
}
