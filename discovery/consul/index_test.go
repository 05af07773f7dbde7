package consul

import "testing"

func TestNextIndex(t *testing.T) {
	cases := []struct{ prev, got, want uint64 }{
		{0, 12, 12},  // first answer
		{12, 15, 15}, // moved on
		{15, 15, 15}, // wait expired, nothing changed
		{15, 3, 0},   // went backwards: start over with a non-blocking query
		{0, 0, 1},    // a 0 from the server is never sent back as 0
		{7, 0, 0},    // backwards to 0 resets, and the next 0 becomes 1
	}
	for _, c := range cases {
		if got := nextIndex(c.prev, c.got); got != c.want {
			t.Errorf("nextIndex(%d, %d) = %d, want %d", c.prev, c.got, got, c.want)
		}
	}
}
