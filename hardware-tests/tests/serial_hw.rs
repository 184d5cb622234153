//! Opt-in: runnel reading a real serial port. Without `RUNNEL_HW_SERIAL`
//! these tests say why they skip and pass. See `src/lib.rs` for the
//! variables and README's "On real hardware" for the wiring.

use runnel_hardware_tests::{ask_person, from_env, loopback, unplug};

#[test]
fn readings_through_a_real_serial_line_arrive_in_their_windows_at_line_rate() {
    let setup = match from_env() {
        Ok(s) => s,
        Err(why) => return eprintln!("{why}"),
    };
    for &baud in &setup.bauds {
        let r = loopback(&setup, baud, 10.0);
        eprintln!(
            "{}: {} baud: {} lines in {:.2} s = {:.0} lines/s; the line carries at most {:.0} lines/s of this length",
            setup.port.display(),
            r.baud,
            r.lines,
            r.seconds,
            r.lines_per_second(),
            r.line_rate
        );
        // runnel must keep up with the line (the time includes start-up
        // of the write and the last window's wait).
        assert!(
            r.lines_per_second() >= 0.8 * r.line_rate,
            "runnel fell behind the line at {baud} baud: {r:?}"
        );
    }
}

#[test]
fn an_adapter_pulled_out_and_put_back_loses_nothing_read_before() {
    let setup = match from_env() {
        Ok(s) => s,
        Err(why) => return eprintln!("{why}"),
    };
    if std::env::var("RUNNEL_HW_UNPLUG").as_deref() != Ok("1") {
        return eprintln!("skipped: set RUNNEL_HW_UNPLUG=1 to be asked to unplug and replug the adapter");
    }
    unplug(&setup, setup.bauds[0], &mut ask_person);
}
