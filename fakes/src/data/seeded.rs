//! The seeded invoice's shape as typed fields: serializing them gives the bytes of the
//! invoice's `Value` without building one, which is how bulk invoices render fast.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::Value;

use super::{DAY, SeedPos, seed_times};

pub(super) const PRODUCTS: [&str; 6] = [
    "Platform subscription (annual seat license)",
    "API request volume above the included quota",
    "Premium support plan with 4h response time",
    "Data retention add-on: 24 months of events",
    "Single sign-on (SAML/OIDC) and SCIM add-on",
    "Professional services: onboarding workshop",
];

fn customer_num(num: usize) -> usize {
    (num - 1) / 4 % 1000 + 1
}

/// The customer of seeded invoice `num`: its id, email and name.
pub(super) fn seed_customer(num: usize) -> [String; 3] {
    let cust = customer_num(num);
    [
        Text::Customer(cust).to_string(),
        Text::CustomerEmail(cust).to_string(),
        Text::CustomerName(cust).to_string(),
    ]
}

/// The seeded strings, printed straight into the output (serde's `collect_str`): a page
/// of bulk invoices would otherwise allocate some 1,600 small strings.
#[derive(Clone, Copy)]
enum Text {
    Customer(usize),
    CustomerEmail(usize),
    CustomerName(usize),
    /// Invoice number, customer number.
    Description(usize, usize),
    HostedUrl(usize),
    Id(usize),
    Number(usize),
    /// Invoice number, line index.
    LineId(usize, usize),
    PriceId(usize),
    ProductId(usize),
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Text::Customer(cust) => write!(f, "cus_{cust:04}"),
            Text::CustomerEmail(cust) => write!(f, "customer{cust:04}@example.com"),
            Text::CustomerName(cust) => write!(f, "Customer {cust:04}"),
            Text::Description(num, cust) => write!(
                f,
                "Invoice {} for services rendered to {}",
                10_000 + num,
                Text::CustomerName(cust)
            ),
            Text::HostedUrl(num) => write!(f, "https://invoice.example.com/i/{}", Text::Id(num)),
            Text::Id(num) => write!(f, "in_{num:06}"),
            Text::Number(num) => write!(f, "INV-{}", 10_000 + num),
            Text::LineId(num, j) => write!(f, "il_{num:06}_{j}"),
            Text::PriceId(j) => write!(f, "price_{:04}", j + 1),
            Text::ProductId(j) => write!(f, "prod_{:04}", j + 1),
        }
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The seeded invoice number `num` (id "in_{num:06}"); about 2.4 KB as JSON.
pub(super) fn seed_invoice(sp: SeedPos) -> Value {
    serde_json::to_value(SeedInvoice::new(sp)).unwrap_or_default()
}

// Fields are declared in byte order of their names, the order serde_json's (sorted)
// object maps print theirs: serializing a `SeedInvoice` directly and serializing its
// `Value` give the same bytes.

/// A seeded invoice.
#[derive(Serialize)]
pub(crate) struct SeedInvoice {
    amount_due: i64,
    amount_paid: i64,
    created: i64,
    currency: &'static str,
    customer: Text,
    customer_email: Text,
    customer_name: Text,
    description: Text,
    due_date: Option<i64>,
    hosted_invoice_url: Text,
    id: Text,
    lines: Lines,
    livemode: bool,
    metadata: Metadata,
    number: Text,
    object: &'static str,
    status: &'static str,
    updated: i64,
}

#[derive(Serialize)]
struct Lines {
    data: [Line; 6],
    has_more: bool,
    object: &'static str,
}

#[derive(Serialize)]
struct Line {
    amount: i64,
    currency: &'static str,
    description: &'static str,
    id: Text,
    object: &'static str,
    period: Period,
    price: Price,
    quantity: i64,
    unit_amount: i64,
}

#[derive(Serialize)]
struct Period {
    end: i64,
    start: i64,
}

#[derive(Serialize)]
struct Price {
    id: Text,
    product: Text,
    recurring: Recurring,
    unit_amount: i64,
}

#[derive(Serialize)]
struct Recurring {
    interval: &'static str,
}

#[derive(Serialize)]
struct Metadata {
    source: &'static str,
}

impl SeedInvoice {
    pub(crate) fn new(sp: SeedPos) -> SeedInvoice {
        let SeedPos { num, pos, n, clock } = sp;
        let (created, updated) = seed_times(pos, n, clock);
        let cust = customer_num(num);
        let paid = num % 3 == 0;
        let due_date = if paid {
            (num % 9 != 0).then_some(created + 14 * DAY)
        } else if num % 2 == 0 {
            // More than 3 days overdue.
            Some(clock - (4 + (num % 26) as i64) * DAY)
        } else {
            Some(clock + (1 + (num % 14) as i64) * DAY)
        };
        let data = std::array::from_fn(|j| {
            let unit = 500 + ((num * 31 + j * 17) % 100) as i64 * 25;
            let qty = 1 + ((num + j) % 3) as i64;
            Line {
                amount: unit * qty,
                currency: "usd",
                description: PRODUCTS[j],
                id: Text::LineId(num, j),
                object: "line_item",
                period: Period {
                    end: created + 30 * DAY,
                    start: created,
                },
                price: Price {
                    id: Text::PriceId(j),
                    product: Text::ProductId(j),
                    recurring: Recurring { interval: "month" },
                    unit_amount: unit,
                },
                quantity: qty,
                unit_amount: unit,
            }
        });
        let total: i64 = data.iter().map(|l: &Line| l.amount).sum();
        SeedInvoice {
            amount_due: total,
            amount_paid: if paid { total } else { 0 },
            created,
            currency: "usd",
            customer: Text::Customer(cust),
            customer_email: Text::CustomerEmail(cust),
            customer_name: Text::CustomerName(cust),
            description: Text::Description(num, cust),
            due_date,
            hosted_invoice_url: Text::HostedUrl(num),
            id: Text::Id(num),
            lines: Lines {
                data,
                has_more: false,
                object: "list",
            },
            livemode: false,
            metadata: Metadata {
                source: "fake_vendor",
            },
            number: Text::Number(num),
            object: "invoice",
            status: if paid { "paid" } else { "open" },
            updated,
        }
    }
}
