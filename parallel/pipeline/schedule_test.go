package pipeline

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func dispatch(seqs ...SeqID) Event    { return Event{Type: Dispatch, Seqs: seqs} }
func done(step Step, stage int) Event { return Event{Type: StageDone, Step: step, Stage: stage} }
func failed(step Step, stage int) Event {
	return Event{Type: StageFailed, Step: step, Stage: stage, Err: errors.New("link closed")}
}
func release(q SeqID, blocks ...int32) Event       { return Event{Type: Free, Seq: q, Blocks: blocks} }
func cancel(q SeqID) Event                         { return Event{Type: Cancel, Seq: q} }
func steps(s ...Step) []Step                       { return s }
func completed(step Step, seqs ...SeqID) Completed { return Completed{Step: step, Seqs: seqs} }

// want is what the schedule must have produced after all events (the
// Ready accumulated since the start), and the micro-batches still in flight.
type want struct {
	complete []Completed
	freed    []Freed
	aborted  []Aborted
	retry    []SeqID
	failed   []SeqID
	inFlight []Step
	err      string // the last event's error, when it must fail ("" none)
	broken   bool
}

func TestSchedule(t *testing.T) {
	cases := []struct {
		name   string
		cfg    Config
		events []Event
		want   want
	}{
		{
			name:   "a micro-batch goes round three stages",
			cfg:    Config{Stages: 3},
			events: []Event{dispatch(1, 2), done(1, 0), done(1, 1), done(1, 2)},
			want:   want{complete: []Completed{completed(1, 1, 2)}},
		},
		{
			name:   "S stages keep S micro-batches in flight",
			cfg:    Config{Stages: 3},
			events: []Event{dispatch(1), dispatch(2), dispatch(3), dispatch(4)},
			want:   want{inFlight: steps(1, 2, 3), err: "pipeline full"},
		},
		{
			name:   "with a draft, S+1",
			cfg:    Config{Stages: 3, Draft: true},
			events: []Event{dispatch(1), dispatch(2), dispatch(3), dispatch(4)},
			want:   want{inFlight: steps(1, 2, 3, 4)},
		},
		{
			name:   "a sequence is in one micro-batch at a time",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1, 2), dispatch(2, 3)},
			want:   want{inFlight: steps(1), err: "sequence already in flight"},
		},
		{
			name:   "the last stage's done implies the earlier stages' (reordered events)",
			cfg:    Config{Stages: 3},
			events: []Event{dispatch(1), done(1, 2), done(1, 0), done(1, 1)},
			want:   want{complete: []Completed{completed(1, 1)}},
		},
		{
			name: "a later step's done implies the earlier steps' at that stage",
			cfg:  Config{Stages: 2},
			events: []Event{dispatch(1), dispatch(2), done(2, 1),
				done(1, 1), done(1, 0)}, // late duplicates change nothing
			want: want{complete: []Completed{completed(1, 1), completed(2, 2)}},
		},
		{
			name:   "micro-batches come back in step order",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1), dispatch(2), done(2, 0), done(1, 0)},
			want:   want{inFlight: steps(1, 2)},
		},
		{
			name:   "done for a step never sent",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1), done(2, 0)},
			want:   want{inFlight: steps(1), err: "unknown step"},
		},
		{
			name:   "done for a stage outside the ring",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1), done(1, 2)},
			want:   want{inFlight: steps(1), err: "unknown step"},
		},
		{
			name:   "blocks of a sequence not in flight are freed at once",
			cfg:    Config{Stages: 2},
			events: []Event{release(7, 3, 4)},
			want:   want{freed: []Freed{{Seq: 7, Blocks: []int32{3, 4}}}},
		},
		{
			name:   "blocks of a micro-batch in the pipeline are freed when it is back",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1, 2), done(1, 0), release(2, 9), done(1, 1)},
			want: want{complete: []Completed{completed(1, 1, 2)},
				freed: []Freed{{Seq: 2, Blocks: []int32{9}}}},
		},
		{
			name:   "blocks in the pipeline stay held while it runs",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1, 2), release(2, 9), done(1, 0)},
			want:   want{inFlight: steps(1)},
		},
		{
			name: "cancelling a sequence whose micro-batch is in flight drops its rows and frees on return",
			cfg:  Config{Stages: 3},
			events: []Event{dispatch(1, 2), dispatch(3), cancel(2), release(2, 5, 6), done(1, 2),
				dispatch(2)}, // back at the head: it may be dispatched again (or its id reused)
			want: want{complete: []Completed{{Step: 1, Seqs: []SeqID{1}, Dropped: []SeqID{2}}},
				freed: []Freed{{Seq: 2, Blocks: []int32{5, 6}}}, inFlight: steps(2, 3)},
		},
		{
			name:   "cancelling a sequence not in flight changes nothing",
			cfg:    Config{Stages: 2},
			events: []Event{cancel(4), dispatch(4), done(1, 1)},
			want:   want{complete: []Completed{completed(1, 4)}},
		},
		{
			name: "a stage failing mid-step aborts every micro-batch in flight; retries left are retried",
			cfg:  Config{Stages: 3, Retries: 1},
			events: []Event{dispatch(1, 2), dispatch(3), done(1, 0), release(3, 8), cancel(1),
				failed(1, 1)},
			want: want{aborted: []Aborted{{Step: 1, Seqs: []SeqID{1, 2}}, {Step: 2, Seqs: []SeqID{3}}},
				retry: []SeqID{2, 3}, freed: []Freed{{Seq: 3, Blocks: []int32{8}}}, broken: true},
		},
		{
			name:   "a broken ring dispatches nothing",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1), failed(1, 1), dispatch(2)},
			want:   want{aborted: []Aborted{{Step: 1, Seqs: []SeqID{1}}}, failed: []SeqID{1}, broken: true, err: "pipeline broken"},
		},
		{
			name: "retries run out",
			cfg:  Config{Stages: 2, Retries: 1},
			events: []Event{dispatch(1), failed(1, 1), {Type: Reset}, dispatch(1), failed(2, 0),
				{Type: Reset}, dispatch(1), done(3, 1)},
			want: want{aborted: []Aborted{{Step: 1, Seqs: []SeqID{1}}, {Step: 2, Seqs: []SeqID{1}}},
				retry: []SeqID{1}, failed: []SeqID{1}, complete: []Completed{completed(3, 1)}},
		},
		{
			name:   "a reset waits for the micro-batches in flight",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1), {Type: Reset}},
			want:   want{inFlight: steps(1), err: "reset with 1 micro-batches in flight"},
		},
		{
			name:   "a late done after a failure is ignored",
			cfg:    Config{Stages: 2},
			events: []Event{dispatch(1), failed(1, 1), done(1, 1)},
			want:   want{aborted: []Aborted{{Step: 1, Seqs: []SeqID{1}}}, failed: []SeqID{1}, broken: true},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			var acc Ready
			for i, ev := range tc.events {
				err = s.Step(ev)
				if err != nil && (i != len(tc.events)-1 || tc.want.err == "") {
					t.Fatalf("event %d (%+v): %v", i, ev, err)
				}
				r := s.Ready()
				acc.Complete = append(acc.Complete, r.Complete...)
				acc.Freed = append(acc.Freed, r.Freed...)
				acc.Aborted = append(acc.Aborted, r.Aborted...)
				acc.Retry = append(acc.Retry, r.Retry...)
				acc.Failed = append(acc.Failed, r.Failed...)
				s.Advance()
			}
			if tc.want.err != "" && (err == nil || !strings.Contains(err.Error(), tc.want.err)) {
				t.Errorf("last event: error %v, want %q", err, tc.want.err)
			}
			check := func(what string, got, want any) {
				if !reflect.DeepEqual(got, want) {
					t.Errorf("%s: got %+v, want %+v", what, got, want)
				}
			}
			check("complete", acc.Complete, tc.want.complete)
			check("freed", acc.Freed, tc.want.freed)
			check("aborted", acc.Aborted, tc.want.aborted)
			check("retry", acc.Retry, tc.want.retry)
			check("failed", acc.Failed, tc.want.failed)
			var inFlight []Step
			for _, mb := range s.InFlight() {
				inFlight = append(inFlight, mb.Step)
			}
			check("in flight", inFlight, tc.want.inFlight)
			if (s.Broken() != nil) != tc.want.broken {
				t.Errorf("broken: %v, want %v", s.Broken(), tc.want.broken)
			}
		})
	}
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && (s[:len(sub)] == sub || contains(s[1:], sub)))
}

// TestScheduleNeverReusesBlocksInFlight drives a fixed pseudo-random stream
// of dispatches, frees and stage completions through an allocator and
// checks, independently of the schedule's own bookkeeping, that a block
// handed back by Ready.Freed is never one that a micro-batch in flight
// writes, and that at most S micro-batches are in flight.
func TestScheduleNeverReusesBlocksInFlight(t *testing.T) {
	const S = 3
	s, _ := New(Config{Stages: S})
	owner := map[SeqID][]int32{}  // blocks each live sequence holds at the head
	writing := map[Step][]int32{} // blocks each micro-batch in flight writes
	var pool []int32
	for b := int32(0); b < 64; b++ {
		pool = append(pool, b)
	}
	x := uint64(12345)
	rnd := func(n int) int { x = x*6364136223846793005 + 1442695040888963407; return int(x>>33) % n }
	next, freedCount := SeqID(1), 0
	for iter := 0; iter < 5000; iter++ {
		switch rnd(5) {
		case 0: // a new sequence, or a live one not in flight, forms a micro-batch
			q := SeqID(rnd(int(next)) + 1)
			if _, live := owner[q]; !live && len(pool) >= 3 {
				q, next = next, next+1
				n := 1 + rnd(3)
				owner[q], pool = append([]int32(nil), pool[:n]...), pool[n:]
			}
			if _, busy := s.Where(q); owner[q] == nil || busy || !s.CanDispatch() {
				continue
			}
			if err := s.Step(dispatch(q)); err != nil {
				t.Fatal(err)
			}
			writing[s.InFlight()[len(s.InFlight())-1].Step] = owner[q]
		case 1: // a live sequence ends: the head releases its blocks
			for q, b := range owner {
				if err := s.Step(release(q, b...)); err != nil {
					t.Fatal(err)
				}
				delete(owner, q)
				break
			}
		default: // the oldest micro-batch advances a stage
			if fl := s.InFlight(); len(fl) > 0 {
				if err := s.Step(done(fl[0].Step, fl[0].Done)); err != nil {
					t.Fatal(err)
				}
			}
		}
		r := s.Ready()
		for _, c := range r.Complete {
			delete(writing, c.Step)
		}
		for _, f := range r.Freed {
			for step, bs := range writing {
				for _, b := range f.Blocks {
					if slices.Contains(bs, b) {
						t.Fatalf("iteration %d: block %d freed while step %d writes it", iter, b, step)
					}
				}
			}
			pool = append(pool, f.Blocks...)
			freedCount++
		}
		s.Advance()
		if n := len(s.InFlight()); n > S {
			t.Fatalf("%d micro-batches in flight with %d stages", n, S)
		}
	}
	if freedCount < 100 || next < 100 {
		t.Fatalf("the stream freed %d times over %d sequences: too little to test", freedCount, next)
	}
}
